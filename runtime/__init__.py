"""What generated modules import at run time: autograd glue, states, varlen."""
