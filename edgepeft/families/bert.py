"""BERT, MiniLM and checkpoints of that shape (``BertForSequenceClassification``): the pooler's
dense + tanh on the first token, then the classifier."""

from edgepeft.families.common import Encoder

ENCODER = Encoder(prefix="bert", head=(("bert.pooler.dense", "tanh"), ("classifier", None)))
