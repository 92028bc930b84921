"""Hyper-representation learning (meta-learning): a shared encoder tuned for few-shot tasks.

Franceschi, Frasconi, Salzo, Grazzi, Pontil, "Bilevel programming for hyperparameter optimization
and meta-learning", ICML 2018, section 4: the upper variable is a representation (an encoder) and
the lower variable a classifier trained on the support set of a task; the representation is
judged by the query loss of that classifier. As in the official codes of BO-REP (Hao, Gong, Liu,
ICLR 2024; Amazon reviews, RNN encoder), SLIP (Gong, Hao, Liu, ICML 2024; SNLI, NLI pair encoder)
and AdamBO (Gong, Hao, Liu, TMLR 2025; TREC, transformer encoder), the lower variable is one head
*shared* by all tasks (the ``meta_learning`` / ``hyper-representation`` folders of the
MingruiLiu-ML-Lab repositories on GitHub and jhao6/d3x645 for AdamBO).

Variables and losses, with tasks t = (S_t, Q_t) from :mod:`problems.episodes` (S_t the support,
Q_t the query samples with their task labels) and B a batch of train-task indices:

    x = encoder parameters,  enc(x, a) in R^d          (mlp / cnn on images; rnn / lstm / gru /
                                                         transformer on text; PairEncoder on SNLI)
    y = head parameters,     head(y, h) in R^K          (Linear(d, K), or d -> head_hidden -> K with tanh)

    g(x, y; B) = 1/|B| sum_{t in B} CE(head(y, enc(x, S_t)), labels(S_t)) + reg ||y||^2
    f(x, y; B) = 1/|B| sum_{t in B} CE(head(y, enc(x, Q_t)), labels(Q_t))

CE is the mean cross-entropy over the task's samples. The penalty is squared (AdamBO, 1e-4 ||y||^2),
so g is (2 reg)-strongly convex in y for a linear head; BO-REP and SLIP add 1e-4 ||y|| unsquared,
which is not strongly convex.

What the test tasks hold out (``held_out``, :mod:`problems.episodes`; train and test tasks never
share a sample) and how tasks are labelled (``labels``):

* ``held_out="samples"`` (the default without groups): test tasks draw the same classes from a
  held-out ``test_share`` of every class's samples. SLIP (SNLI) and AdamBO (TREC) test this way;
* ``held_out="groups"`` (the default with groups): test tasks come from held-out groups with the
  same classes (BO-REP: 3 held-out Amazon domains);
* ``held_out="classes"``: test tasks hold classes no train task has (few-shot learning of new
  classes, as in Franceschi et al.'s Omniglot / miniImageNet experiments); needs >= 2 n_way classes.

* ``labels="original"`` (the default unless held_out="classes"): K = number of corpus classes and
  the corpus labels are kept (SLIP's 3-way SNLI head, AdamBO's 6-way TREC head, BO-REP's positive
  / negative); a task still holds n_way of the classes;
* ``labels="permuted"`` (the default with held_out="classes", where the corpus labels of the test
  classes would be outputs the shared head learned to suppress): K = n_way, every task relabels
  its classes by a random permutation, so the head must adapt.

With permuted labels a single shared head cannot fit all train tasks (every class gets every
label across tasks), so f(x, y*(x)) stays near log(n_way) for any x and training the encoder
barely moves the adapted test accuracy. Measured with SOBA (default step sizes 0.1, seed 0,
torch on one thread, 300 steps) on the real MNIST-5k: held-out classes + permuted labels
0.663 -> 0.658 at the default sizes and 0.410 -> 0.424 at the old tiny sizes; held-out samples +
original labels 0.654 -> 0.921 at the default sizes and 0.413 -> 0.900 at the tiny preset
(Rotten Tomatoes fixtures, 30 steps: 0.58 -> 0.57 permuted, 0.54 -> 0.92 original). Hence the
defaults "samples" + "original"; test tasks are labelled like the train tasks.

Batches are LongTensors of train-task indices drawn i.i.d. uniformly (``tasks_per_batch``; None
is every train task); both levels are finite sums over the ``n_train_tasks`` tasks
(``n_samples``), so SABA applies. The support (or query) samples of a whole batch go through the
encoder in one call.

Evaluation (held-out test tasks, which share no sample with the train tasks): the features of
every test sample are computed with x fixed (no gradient); a copy of y takes ``adapt_steps``
full-batch gradient steps of task t's support loss CE + reg ||y||^2 with step ``adapt_lr``; the
query accuracy of the adapted copy, averaged over test tasks, is ``test_accuracy``. The official
codes adapt the shared head itself and keep training from the adapted head; here y is never
modified.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from bilevel.problem import BilevelProblem, check_level
from bilevel.registry import register_problem
from bilevel.tree import Tree

from .batches import in_chunks, select, trim_padding
from .corpora import encode_text, load_corpus
from .episodes import SPLIT_MODES, Episodes, split_episodes
from .models import (MLP, ConvEncoder, FunctionalModel, PairEncoder, RecurrentEncoder, TransformerEncoder,
                     cross_entropy, squared_norm)
from .options import check_choice, check_int, check_precision, check_real, option_error
from .runs import default_run

DATASETS = ("mnist-5k", "rotten-tomatoes", "amazon", "snli", "table")
IMAGE_ENCODERS = ("mlp", "cnn")
TEXT_ENCODERS = ("rnn", "lstm", "gru", "transformer")
LABEL_MODES = ("permuted", "original")
EVAL_TRAIN_TASKS = 64   # train tasks (the first ones, a fixed random subset) behind the train_* metrics
NAME = "hyperrep"


@register_problem(NAME, paper="Franceschi et al., Bilevel programming for hyperparameter optimization and "
                  "meta-learning, ICML 2018 (hyper-representation); BO-REP ICLR 2024 (Amazon), SLIP ICML 2024 "
                  "(SNLI), AdamBO TMLR 2025 (TREC)")
class HyperRepresentation(BilevelProblem):
    """Few-shot hyper-representation: encoder x (upper), shared task head y (lower).

    Attributes: ``corpus``, ``split`` (:class:`problems.episodes.TaskSplit`), ``train_tasks`` and
    ``test_tasks`` (:class:`problems.episodes.Episodes`), ``inputs`` (standardized features
    (N, 784) or token ids (N, L) / (N, 2, L)), ``encoder`` and ``head``
    (:class:`problems.models.FunctionalModel`), ``feature_dim``, ``n_outputs``, ``vocab``.
    """

    name = NAME
    headline_metrics = ("test_accuracy",)
    #: grid-point choice (bilevel.report.selection): the upper objective f on the fixed train
    #: tasks' query sets (the bilevel validation data; test tasks never enter the choice).
    selection = ("train_query_loss", "min", "test_accuracy")

    PRESETS: Dict[str, Dict[str, Any]] = {
        # Seconds on 2 CPU cores: offline MNIST-5k, 5-way 3-shot tasks (3 query samples per class)
        # over all 10 digits with their own labels (a 10-output head), test tasks from a held-out
        # 30% of every digit's samples, a 784 -> 32 -> 16 encoder. 3 + 3 samples per class fit
        # the 20-per-class test fixtures (6 test, 14 train samples per class). Real MNIST-5k, SOBA
        # at its default steps: adapted test accuracy 0.41 -> 0.90 in 300 steps (about 3 s).
        "tiny": dict(dataset="mnist-5k", encoder="mlp", held_out="samples", labels="original", test_share=0.3,
                     n_way=5, k_support=3, k_query=3, n_train_tasks=60, n_test_tasks=20, tasks_per_batch=4,
                     enc_dim=16, hidden=32, layers=1, head_hidden=0, adapt_steps=10, adapt_lr=0.5),
        # SLIP hyper-representation (its official code's hyper-representation folder): SNLI (data_path = an
        # InferSent directory), 2 of the 3 labels per task, 10 support + 10 query per label,
        # 500 train / 100 test tasks, 20 tasks per step, the original 3-way labels, 2-layer Elman
        # RNN with 300-d embeddings (GloVe through glove_path), a 1-step test adaptation at 10x
        # the inner lr (0.5). Differs: encoder 256 instead of 4096 and one hidden head layer of
        # 128 instead of 1024 -> 1024 (reduced to one CPU); squared 1e-4 ||y||^2 instead of 1e-4 ||y||;
        # test tasks come from a held-out 25% of SNLI train instead of SNLI test; the pair
        # features have no Linear(16384 -> 4096) layer; y is never mutated by testing.
        "paper": dict(dataset="snli", encoder="rnn", labels="original", n_way=2, k_support=10, k_query=10,
                      n_train_tasks=500, n_test_tasks=100, tasks_per_batch=20, enc_dim=256, embed_dim=300,
                      layers=2, head_hidden=128, max_len=48, reg=1e-4, adapt_steps=1, adapt_lr=0.5),
    }

    #: Default run of ``bilevel run problem=hyperrep preset=tiny`` (bilevel.config.default_run):
    #: 100 steps, lower_lr 0.1 for all. StocBiO at upper_lr 0.1 with 10 inner / 10 Neumann steps
    #: pushes the encoder past 1e6 (diverged); normalized steps of length 0.05 leave test
    #: accuracy near chance, 0.02 works. Measured (seed 0, real MNIST-5k): adapted test accuracy
    #: 0.53 (lower-only) -> 0.83-0.90.
    RUNS = {
        "tiny": default_run(steps=100, eval_every=20, solver_options={
            "lower-only": dict(lower_lr=0.1),
            "soba": dict(upper_lr=dict(value=0.1, decay=0.5), lower_lr=dict(value=0.1, decay=0.5),
                         z_lr=dict(value=0.1, decay=0.5)),
            "stocbio": dict(upper_lr=0.05, lower_lr=0.1, inner_steps=5, neumann_steps=5),
            "aid-cg": dict(upper_lr=0.1, lower_lr=0.1, inner_steps=5, cg_steps=5),
            "bo-rep": dict(upper_lr=0.02, lower_lr=0.1),
            "slip": dict(upper_lr=0.02, lower_lr=0.1)}),
    }

    def __init__(self, dataset: str = "mnist-5k", encoder: Optional[str] = None, data_path: Optional[str] = None,
                 text_column: str = "text", label_column: str = "label", max_samples: Optional[int] = None,
                 labels: Optional[str] = None, n_way: Optional[int] = None, k_support: int = 5, k_query: int = 5,
                 n_train_tasks: int = 200, n_test_tasks: int = 50, tasks_per_batch: Optional[int] = 8,
                 held_out: Optional[str] = None, test_share: float = 0.25, test_groups: Optional[str] = None,
                 enc_dim: int = 64, hidden: int = 128, head_hidden: int = 0,
                 embed_dim: int = 64, layers: int = 1, heads: int = 4, max_len: int = 48, min_freq: int = 1,
                 max_vocab: Optional[int] = 20000, glove_path: Optional[str] = None, reg: float = 1e-3,
                 adapt_steps: int = 10, adapt_lr: float = 0.5, seed: int = 0, dtype: str = "float32"):
        """
        Args:
            dataset: one of "mnist-5k" (offline), "rotten-tomatoes" (offline), "amazon" (BO-REP's
                dataset.json, domains as groups), "snli" (InferSent directory), "table" (csv /
                json / parquet with text_column and label_column, e.g. TREC with "coarse_label").
            encoder: "mlp" or "cnn" for mnist-5k; "rnn", "lstm", "gru" or "transformer" for text
                (SNLI: a PairEncoder around it). None: "mlp" for images, "lstm" for text.
            data_path: the data file (required for amazon, snli and table; optional copy otherwise).
            text_column, label_column: the columns of a "table" file.
            max_samples: keep the first samples of the corpus only (None: all).
            labels: "original" (the corpus classes; the head has one output per class) or
                "permuted" (task labels 0..n_way-1 by a random per-task permutation); None:
                "permuted" with held_out="classes", "original" otherwise (module docstring).
            n_way: classes per task (None: 5 for mnist-5k, 2 otherwise).
            k_support, k_query: samples per class in the support / query set of a task.
            n_train_tasks, n_test_tasks: number of train tasks (the finite sum) and held-out tasks.
            tasks_per_batch: train tasks per mini-batch (i.i.d. uniform); None for all of them.
            held_out: what the test tasks hold out: "samples" (the same classes, other samples),
                "groups" (other groups, e.g. amazon domains; needs a grouped corpus) or "classes"
                (other classes; needs >= 2 n_way classes). None: "groups" for a grouped corpus,
                "samples" otherwise (training the encoder barely helps on new classes with
                permuted labels; see the module docstring for the measurements).
            test_share: share in (0, 1) of every class's samples held out for the test tasks
                ("samples"), or of the groups when test_groups is None ("groups").
            test_groups: comma-separated held-out groups (amazon domains; held_out="groups" only);
                None: a seeded test_share of them.
            enc_dim: encoder output size (MLP / CNN output, RNN hidden size, transformer width).
            hidden: hidden width of the mlp encoder, channels of the cnn, feed-forward width of
                the transformer.
            head_hidden: hidden width of the head (0: a linear head).
            embed_dim: word-embedding size of the recurrent encoders (GloVe's own with glove_path).
            layers: hidden layers of the mlp, recurrent layers (1 or 2), transformer blocks.
            heads: attention heads of the transformer (enc_dim must be divisible by it).
            max_len: tokens kept per sentence.
            min_freq, max_vocab: vocabulary filters (fitted on the train tasks' samples only).
            glove_path: GloVe text file to initialise the embeddings of a recurrent encoder.
            reg: weight (>= 0) of reg ||y||^2 in g (> 0 makes g strongly convex for a linear head).
            adapt_steps: gradient steps (>= 0) of the head copy on a test task's support set.
            adapt_lr: step size (> 0) of those steps.
            seed: seed of the tasks, of the task split and of the GloVe rows of unknown words.
            dtype: "float32" or "float64", for the features and the variables; or "bfloat16":
                float32 variables with the encoder under bf16 autocast (mixed precision).
        """
        check_choice(NAME, "dataset", dataset, DATASETS)
        is_image = dataset == "mnist-5k"
        allowed = IMAGE_ENCODERS if is_image else TEXT_ENCODERS
        encoder = ("mlp" if is_image else "lstm") if encoder is None else encoder
        if encoder not in allowed:
            raise option_error(NAME, "encoder", f"one of {allowed} for dataset {dataset!r}", encoder)
        if labels is not None and labels not in LABEL_MODES:
            raise option_error(NAME, "labels", f"one of {LABEL_MODES} or None", labels)
        dtype, self.autocast = check_precision(NAME, dtype)
        n_way = (5 if is_image else 2) if n_way is None else n_way
        n_way = check_int(NAME, "n_way", n_way, minimum=2)
        self.k_support, self.k_query = check_int(NAME, "k_support", k_support), check_int(NAME, "k_query", k_query)
        self.n_train_tasks = check_int(NAME, "n_train_tasks", n_train_tasks)
        self.n_test_tasks = check_int(NAME, "n_test_tasks", n_test_tasks)
        self.tasks_per_batch = check_int(NAME, "tasks_per_batch", tasks_per_batch, allow_none=True)
        sizes = {name: check_int(NAME, name, value) for name, value in (("enc_dim", enc_dim), ("hidden", hidden),
                 ("embed_dim", embed_dim), ("layers", layers), ("heads", heads), ("max_len", max_len),
                 ("min_freq", min_freq))}
        head_hidden = check_int(NAME, "head_hidden", head_hidden, minimum=0)
        check_int(NAME, "max_samples", max_samples, allow_none=True)
        check_int(NAME, "max_vocab", max_vocab, allow_none=True)
        self.reg = check_real(NAME, "reg", reg, 0.0, include_low=True, rule="a number >= 0")
        self.adapt_steps = check_int(NAME, "adapt_steps", adapt_steps, minimum=0)
        self.adapt_lr = check_real(NAME, "adapt_lr", adapt_lr, 0.0, rule="a positive number")
        self.seed = check_int(NAME, "seed", seed, minimum=0)
        if glove_path is not None and encoder not in ("rnn", "lstm", "gru"):
            raise option_error(NAME, "glove_path", "None unless the encoder is rnn, lstm or gru", glove_path)
        self.dataset, self.encoder_name, self.n_way = dataset, encoder, n_way
        self.dtype = dtype

        self.corpus = load_corpus(dataset, data_path, max_samples, text_column, label_column)
        if held_out is not None and held_out not in SPLIT_MODES:
            raise option_error(NAME, "held_out", f"one of {SPLIT_MODES} or None", held_out)
        if held_out is None:
            held_out = "groups" if self.corpus.groups is not None else "samples"
        groups = [g.strip() for g in test_groups.split(",")] if test_groups else None
        if groups is not None and held_out != "groups":
            raise option_error(NAME, "test_groups", f"None unless held_out is 'groups' (held_out={held_out!r})",
                               test_groups)
        self.split = split_episodes(self.corpus.labels, n_way, self.k_support, self.k_query, self.n_train_tasks,
                                    self.n_test_tasks, self.seed, groups=self.corpus.groups, test_groups=groups,
                                    held_out=held_out, test_share=test_share)
        self.train_tasks, self.test_tasks = self.split.train, self.split.test
        if labels is None:
            labels = "permuted" if self.split.mode == "classes" else "original"
        self.labels_mode = labels
        fit = self.train_tasks.sample_indices()
        self.vocab, embeddings = None, None
        if is_image:
            features = torch.as_tensor(self.corpus.inputs, dtype=self.dtype)
            mean, std = features[fit].mean(), features[fit].std()
            self.inputs = (features - mean) / std
        else:
            encoded = encode_text(self.corpus, fit, max_len=sizes["max_len"], min_freq=sizes["min_freq"],
                                  max_vocab=max_vocab, glove_path=glove_path, seed=self.seed)
            self.inputs, self.vocab, embeddings = encoded.tokens, encoded.vocab, encoded.embeddings
        module, self.feature_dim = self._encoder_module(sizes, embeddings)
        self.encoder = FunctionalModel(module, self.dtype, self.autocast)
        self.n_outputs = n_way if labels == "permuted" else self.corpus.n_classes
        self.head = FunctionalModel(MLP(self.feature_dim, [head_hidden] if head_hidden else [], self.n_outputs),
                                    self.dtype)
        self.targets = {name: self._targets(episodes) for name, episodes in
                        (("train", self.train_tasks), ("test", self.test_tasks))}
        self.eval_train_batch = torch.arange(min(EVAL_TRAIN_TASKS, self.n_train_tasks))

    # -- construction helpers --------------------------------------------------------------------

    def _encoder_module(self, sizes: Dict[str, int], embeddings: Optional[Tensor]):
        """(module, feature size). Image encoders end in tanh (bounded features, like the RNNs)."""
        name, d = self.encoder_name, sizes["enc_dim"]
        if name == "mlp":
            return nn.Sequential(MLP(self.inputs.shape[1], [sizes["hidden"]] * sizes["layers"], d), nn.Tanh()), d
        if name == "cnn":
            return nn.Sequential(ConvEncoder(d, channels=sizes["hidden"]), nn.Tanh()), d
        vocab_size = len(self.vocab)
        if name == "transformer":
            if d % sizes["heads"]:
                raise option_error(NAME, "heads", f"a divisor of enc_dim={d}", sizes["heads"])
            module = TransformerEncoder(vocab_size, d, sizes["heads"], sizes["layers"], sizes["hidden"],
                                        sizes["max_len"])
        else:
            if sizes["layers"] > 2:
                raise option_error(NAME, "layers", "1 or 2 for a recurrent encoder", sizes["layers"])
            embed_dim = sizes["embed_dim"] if embeddings is None else embeddings.shape[1]
            module = RecurrentEncoder(vocab_size, embed_dim, d, name, sizes["layers"], embeddings)
        if self.corpus.kind == "pairs":
            return PairEncoder(module), 4 * d
        return module, d

    def _targets(self, episodes: Episodes) -> Dict[str, Tensor]:
        if self.labels_mode == "permuted":
            return {"support": episodes.support_labels, "query": episodes.query_labels}
        return {which: episodes.original_labels(which) for which in ("support", "query")}

    # -- the pieces of the losses ----------------------------------------------------------------

    def features(self, x: Tree, indices: Tensor) -> Tensor:
        """enc(x, samples ``indices``) in one encoder call: (len(indices), feature_dim)."""
        inputs = self.inputs[indices]
        if self.vocab is not None:
            inputs = trim_padding(inputs)
        return self.encoder(x, inputs)

    def task_loss(self, x: Tree, y: Tree, which: str, batch: Optional[Tensor]) -> Tensor:
        """Mean CE over the ``which`` ("support" / "query") samples of the train tasks ``batch``
        (equal-size tasks, so also the mean over tasks of the per-task mean CE)."""
        indices = select(getattr(self.train_tasks, which), batch)
        labels = select(self.targets["train"][which], batch)
        return cross_entropy(self.head(y, self.features(x, indices.reshape(-1))), labels.reshape(-1))

    # -- the protocol ----------------------------------------------------------------------------

    def lower_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """g: support CE of the train tasks ``batch`` + reg ||y||^2."""
        return self.task_loss(x, y, "support", batch) + self.reg * squared_norm(y)

    def upper_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """f: query CE of the train tasks ``batch``."""
        return self.task_loss(x, y, "query", batch)

    def init(self, generator: torch.Generator):
        """x0, y0: the default initialisations of the encoder and the head, seeded by ``generator``."""
        return self.encoder.init(generator), self.head.init(generator)

    def sample(self, level: str, generator: torch.Generator) -> Optional[Tensor]:
        """``tasks_per_batch`` i.i.d. uniform train-task indices (both levels); None: all tasks."""
        check_level(level)
        if self.tasks_per_batch is None:
            return None
        return torch.randint(self.n_train_tasks, (self.tasks_per_batch,), generator=generator, device=generator.device)

    def n_samples(self, level: str) -> int:
        """Both levels are finite sums over the train tasks."""
        check_level(level)
        return self.n_train_tasks

    # -- evaluation ------------------------------------------------------------------------------

    def test_features(self, x: Tree) -> Dict[str, Tensor]:
        """Encoder features of the test tasks without gradient: "support" (T, n_way k_support, d)
        and "query" (T, n_way k_query, d); each sample is encoded once."""
        tasks = self.test_tasks
        with torch.no_grad():
            x = {k: v.detach() for k, v in x.items()}
            unique = torch.as_tensor(tasks.sample_indices(), device=tasks.support.device)
            feats = in_chunks(lambda part: self.features(x, part), unique)
            return {which: feats[torch.searchsorted(unique, getattr(tasks, which))] for which in ("support", "query")}

    def adapt(self, y: Tree, support_features: Tensor, support_labels: Tensor) -> Tree:
        """One head per task: ``adapt_steps`` gradient steps from a copy of y on each task's
        support loss CE + reg ||y||^2 (features (T, S, d), labels (T, S)); leaves have a leading
        task axis T. y itself is not modified."""
        def support_loss(params: Tree, feats: Tensor, labels: Tensor) -> Tensor:
            return cross_entropy(self.head(params, feats), labels) + self.reg * squared_norm(params)

        # The tasks' losses depend on disjoint head copies, so the gradient of their sum with
        # respect to the stacked copies holds every task's own gradient.
        total = torch.func.vmap(support_loss)
        n_tasks = support_features.shape[0]
        heads = {k: v.detach().unsqueeze(0).expand(n_tasks, *v.shape).clone() for k, v in y.items()}
        for _ in range(self.adapt_steps):
            with torch.enable_grad():
                leaves = {k: v.requires_grad_(True) for k, v in heads.items()}
                grads = torch.autograd.grad(total(leaves, support_features, support_labels).sum(),
                                            list(leaves.values()))
            heads = {k: heads[k].detach() - self.adapt_lr * g for k, g in zip(heads, grads)}
        return heads

    def task_accuracies(self, x: Tree, y: Tree, adapted: bool = True,
                        features: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Query accuracy of each test task (T,), with the adapted head copies or the shared y
        (``features``: precomputed :meth:`test_features`)."""
        feats, targets = features or self.test_features(x), self.targets["test"]
        if adapted:
            heads = self.adapt(y, feats["support"], targets["support"])
            with torch.no_grad():
                logits = torch.func.vmap(self.head)(heads, feats["query"])
        else:
            with torch.no_grad():
                logits = self.head({k: v.detach() for k, v in y.items()}, feats["query"])
        return (logits.argmax(dim=-1) == targets["query"]).to(torch.float64).mean(dim=1)

    def evaluate(self, x: Tree, y: Tree) -> Dict[str, float]:
        """test_accuracy (after adaptation), test_accuracy_unadapted (shared y), and the query
        (f) and support (g) losses on a fixed subset of the train tasks."""
        with torch.no_grad():
            xd, yd = {k: v.detach() for k, v in x.items()}, {k: v.detach() for k, v in y.items()}
            train_query = float(self.upper_loss(xd, yd, self.eval_train_batch))
            train_support = float(self.lower_loss(xd, yd, self.eval_train_batch))
        feats = self.test_features(xd)
        return {
            "test_accuracy": float(self.task_accuracies(xd, yd, True, feats).mean()),
            "test_accuracy_unadapted": float(self.task_accuracies(xd, yd, False, feats).mean()),
            "train_query_loss": train_query,
            "train_support_loss": train_support,
        }
