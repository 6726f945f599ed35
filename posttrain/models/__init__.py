"""Model building (tiny from-scratch models) and loading (any HF causal LM)."""
