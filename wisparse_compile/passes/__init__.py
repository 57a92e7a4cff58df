"""FX passes over the Dynamo graph, run by the backend before AOT autograd.

- ``sparsify``: the rewrite pass (planned linears and expert contractions become sparse ops);
  it drives ``rewrite_linears`` and ``rewrite_experts`` (the patterns) and ``eligibility`` (the rules);
- ``fuse_siblings``: the optional fusion pass over ``sparsify``'s output;
- ``group_quantized``: int8/int4 siblings as one call (on by default; no copied weights);
- ``decisions``: what both record per linear; ``graph_utils``: the FX machinery they share.
"""
