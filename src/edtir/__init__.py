"""edtir."""
