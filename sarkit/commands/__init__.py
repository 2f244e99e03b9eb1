"""One module per subcommand: option parsing and the call to the stage hook, nothing more."""
