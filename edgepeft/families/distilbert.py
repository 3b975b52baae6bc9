"""DistilBERT (``DistilBertForSequenceClassification``): BERT's layer under other names, no
token types, LayerNorm epsilon 1e-12; the head is ``pre_classifier`` + ReLU on the first token,
then ``classifier``."""

from edgepeft.families.common import Encoder

ENCODER = Encoder(prefix="distilbert", head=(("pre_classifier", "relu"), ("classifier", None)),
                  layers="transformer.layer",
                  groups={"qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
                          "o": ("attention.out_lin",), "up": ("ffn.lin1",), "down": ("ffn.lin2",)},
                  norms={"attn": "sa_layer_norm", "out": "output_layer_norm"},
                  activation=lambda cfg: cfg.activation, eps=lambda cfg: 1e-12)
