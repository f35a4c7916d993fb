"""latentforge.preprocess."""
