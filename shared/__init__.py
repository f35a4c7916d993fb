"""latentforge.shared."""
