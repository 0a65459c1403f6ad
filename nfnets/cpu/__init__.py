"""What makes XLA:CPU fast, kept apart from the model code.

  conv        convolutions: im2col for tiny maps, matmul and canonical
              gradients through custom VJPs;
  reductions  weight standardization, bias gradients, channel sums and
              max-pool gradients as matmuls, row sums and masks;
  runtime     process settings (an XLA flag, inline dispatch, kept host
              memory), applied by the entry points.

`nfnets.ops` routes the model's primitives to `conv` and `reductions` on
CPU; on GPU and TPU nothing here runs.
"""
