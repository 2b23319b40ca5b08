"""Planning from the data, as nnU-Net does: the target spacing, each network's topology and its patch."""
