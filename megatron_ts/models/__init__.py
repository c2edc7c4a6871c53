"""The Token-Shuffle decoder: flavors, layer specs, token-shuffle layers and the loss."""
