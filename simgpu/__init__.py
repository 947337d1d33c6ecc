"""A simulated GPU inference service honouring the gpuq request/callback contract."""
