"""Tools for developing Stockroom (tests, benchmark); nothing here runs in the portal."""
