"""What generated torch modules import at run time: chunking, attention, convolution, autograd glue, scalars, tiles."""
