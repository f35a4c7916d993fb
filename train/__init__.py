"""latentforge.train."""
