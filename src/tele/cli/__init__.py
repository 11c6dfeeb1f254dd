"""The `tele` command line: parse, call the daemon, render text or --output json|yaml."""
