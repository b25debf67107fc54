"""Image I/O, MATLAB-compatible resizing, degradations and training datasets."""
