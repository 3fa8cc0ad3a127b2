"""The ``headwater`` command line (front end; the core never imports it)."""
