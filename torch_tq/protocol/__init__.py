"""The wire protocol: commands, their validation, and wire errors in both directions."""
