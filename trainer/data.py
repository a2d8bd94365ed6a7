"""The federated data sets now live in `trainer.tasks`, one module per task; these names stay importable."""

from trainer.tasks.base import ClientData, DataUnavailable
from trainer.tasks.chars import CHAR_VOCAB, UNK_ID, VOCAB_SIZE, decode, encode, encode_tensor
from trainer.tasks.fashion_mnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, fashion_mnist
from trainer.tasks.fortunes import fortunes_texts, minilm_dir, minilm_tokenizer
from trainer.tasks.partition import label_entropy, partition_dirichlet, partition_iid, split_train_test
from trainer.tasks.shakespeare import parse_play, shakespeare_corpus, shakespeare_plays, shakespeare_roles

__all__ = ["CHAR_VOCAB", "ClientData", "DataUnavailable", "FMNIST_CLASSES", "FMNIST_MEAN", "FMNIST_STD", "UNK_ID", "VOCAB_SIZE",
           "decode", "encode", "encode_tensor", "fashion_mnist", "fortunes_texts", "label_entropy", "minilm_dir",
           "minilm_tokenizer", "parse_play", "partition_dirichlet", "partition_iid", "shakespeare_corpus",
           "shakespeare_plays", "shakespeare_roles", "split_train_test"]
