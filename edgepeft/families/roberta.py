"""RoBERTa (``RobertaForSequenceClassification``): positions count the non-pad tokens from
``pad_token_id + 1``; the head is ``classifier.dense`` + tanh on the first token, then ``classifier.out_proj``."""

from edgepeft.families.common import Encoder

ENCODER = Encoder(prefix="roberta", head=(("classifier.dense", "tanh"), ("classifier.out_proj", None)),
                  positions="non_pad")
