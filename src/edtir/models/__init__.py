"""The EDT network (``edt.py``) and checkpoint loading (``checkpoint.py``)."""
