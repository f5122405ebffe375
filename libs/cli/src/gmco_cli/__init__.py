"""gmco: the GMC-O admin command. Each subcommand lives in its own module and is imported only when run."""
