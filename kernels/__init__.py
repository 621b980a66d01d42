"""Pure array kernels of lensjax (installed as ``lensjax.kernels``); they import nothing of lensjax."""
