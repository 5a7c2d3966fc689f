"""``sparsedoc bench``: what each method costs, measured side by side in one run.

* ``step``: training step time and peak memory of every variant (the frozen floor, peft LoRA,
  full fine-tune, the LoRA-MoE dispatches and FFN mode, MixLoRA, X-LoRA), each in its own process,
  interleaved over rounds so the noise of a shared machine hits all of them alike;
* ``dryrun``: parameter counts, FLOPs and DeepSpeed ZeRO memory estimates of a large model,
  built on the meta device (nothing is downloaded or allocated);
* ``generation``: greedy decoding tokens/s with the KV cache, MoE against the base and a merged
  LoRA.
"""
