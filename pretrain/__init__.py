"""Training entry points (`ts-train`) and the bundled TOML configs."""
