"""Preprocessing CLIs (`ts-data`): image/caption WebDataset shards to token shards."""
