"""Subcommands of ``dlm`` beyond LightningCLI's fit/validate/test."""
