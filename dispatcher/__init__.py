"""gpuq dispatcher: places jobs on free GPU slots, tracks them in MySQL, takes callbacks."""
