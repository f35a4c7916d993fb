"""latentforge.devkit: tiny offline models, tokenizers built in code and demo data (tests, bench, demo)."""
