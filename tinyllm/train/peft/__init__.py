"""Parameter-efficient fine-tuning (notes ch.05): methods applied to a model from outside (DESIGN rule 4).

| family (Lialin et al.)   | method                                   | module      |
|--------------------------|------------------------------------------|-------------|
| reparameterised          | LoRA (merge/unmerge, several adapters)   | lora.py     |
| reparameterised + quant  | QLoRA: NF4 + double quantization + LoRA  | nf4.py, qlora.py |
| additive                 | Houlsby adapters (sequential, parallel)  | adapter.py  |
| additive (soft prompts)  | prompt tuning, prefix tuning / P-tuning v2 | prompt.py |
| selective                | BitFit; target selection and accounting  | select.py   |

Each `apply_*` takes a model and returns the adapted one, with every base parameter frozen; the training loop
(tinyllm.train.loop) then trains whatever still requires grad. io.py saves/loads adapter directories in HF
PEFT's format (`adapter_config.json` + `adapter_model.safetensors`); cli.py is `tinyllm merge-adapter`.
"""

from tinyllm.train.peft.adapter import AdapterConfig, apply_adapters, remove_adapters
from tinyllm.train.peft.io import PeftModel, load_adapter, save_adapter
from tinyllm.train.peft.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    delete_adapter,
    disable_adapters,
    merge_adapters,
    merge_and_unload,
    set_adapter,
    unmerge_adapters,
)
from tinyllm.train.peft.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    apply_prefix_tuning,
    apply_prompt_tuning,
)
from tinyllm.train.peft.qlora import QLoraConfig, apply_qlora, base_weight_memory
from tinyllm.train.peft.select import (
    BitFitConfig,
    apply_bitfit,
    print_trainable_parameters,
    trainable_named_parameters,
    trainable_report,
)

__all__ = ["AdapterConfig", "BitFitConfig", "LoraConfig", "LoraLinear", "PeftModel", "PrefixTuningConfig",
           "PromptTuningConfig", "QLoraConfig", "apply_adapters", "apply_bitfit", "apply_lora", "apply_prefix_tuning",
           "apply_prompt_tuning", "apply_qlora", "base_weight_memory", "delete_adapter", "disable_adapters",
           "load_adapter", "merge_adapters", "merge_and_unload", "print_trainable_parameters", "remove_adapters",
           "save_adapter", "set_adapter", "trainable_named_parameters", "trainable_report", "unmerge_adapters"]
