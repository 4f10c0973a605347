"""Configs: the defaults every file in configs/ starts from, and loading a config file."""
