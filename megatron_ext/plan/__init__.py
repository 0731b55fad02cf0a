"""Layout planner for Mixtral on Megatron-Core: memory per GPU, step time, CPU rehearsals.

``python -m megatron_ext.plan`` (see ``__main__``) enumerates TP x PP x VPP x EP x DP x
micro-batch x recomputation for a model preset and GPU count, rejects invalid layouts with the
training script's own ``LayoutError`` messages, estimates memory and step time, and ranks them.

Modules, one concept each:

* ``params``      the parameters a rank holds and Megatron DDP's buffer/shard arithmetic;
* ``memory``      weights, gradients, optimizer states (exact) and totals per GPU;
* ``activations`` activation memory per layer and micro-batches in flight;
* ``hardware``    GPU and interconnect figures;  ``cost``  the step-time / MFU model;
* ``search``      candidate layouts, validation, ranking;  ``report``  text output;
* ``validate``    one command line (``--validate``);
* ``recipe``      cluster recipe files (``examples/*.sh``);  ``rehearse``  CPU rehearsals.

The formulas and the cost model are written out in docs/planner.md. Import the modules
(``from megatron_ext.plan import memory``); this file imports nothing, so that
``python -m megatron_ext.plan`` can quiet Megatron-Core's import-time notices first.
"""
