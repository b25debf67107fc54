"""Subcommands of the ``edtir`` CLI; see ``edtir.cli``."""
