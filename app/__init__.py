"""latentforge.app: the `latentforge` command, the demo, inspect and verify (above both stages)."""
