"""PopulAtion Parameter Averaging."""
