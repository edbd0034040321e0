"""The plugins that ship with adapterhub_cli, registered through the same hooks third-party plugins use."""
