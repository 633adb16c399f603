"""Shared fixtures: tiny models built from config, on the CPU, no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_LLAMA = dict(
    model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
TINY_GPT2 = dict(
    model_type="gpt2", vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
)
FAMILIES = {"llama": TINY_LLAMA, "gpt2": TINY_GPT2}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "data", "fixtures", "tiny_tokenizer")
TINY_CORPUS = os.path.join(REPO, "data", "fixtures", "tiny_corpus.txt")


@pytest.fixture(params=sorted(FAMILIES))
def family_config(request):
    return dict(FAMILIES[request.param])


@pytest.fixture
def exact_fp32():
    """fp32 means fp32: no TF32 in the reference matmuls (the CUDA parity tests use it)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# --- deprecations our code calls fail the test --------------------------------------------------------
# A FutureWarning or DeprecationWarning raised because code of this repository (lightning_dlm/, tests/,
# benchmarks/, data/) called a deprecated API fails the test that triggers it (setup, call or teardown).
# pytest's `filterwarnings` cannot tell: its module field is the module a warning is attributed to,
# which for transformers' deprecations is a transformers or torch file. So the stack decides, at the
# moment the warning is shown: the caller responsible is the first frame outside the function that
# warned and outside call plumbing (nn.Module.__call__, decorators, the import system), or the frame
# the warning is attributed to (its stacklevel); the warning is ours if either is in the repository.
# Third-party-internal warnings (their own code calling a deprecated API, even when our call started
# it) are left to the warnings summary; the known ones are ignored in setup.cfg, one line each.
import inspect  # noqa: E402
import warnings  # noqa: E402

# jsonargparse shows each of its deprecations once per process, to whoever calls first: every call, here
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "all")
OUR_FOLDERS = tuple(os.path.join(REPO, name) + os.sep for name in ("lightning_dlm", "tests", "benchmarks", "data"))
DEPRECATIONS = (FutureWarning, DeprecationWarning)
# frames between a deprecated function and its caller that are nobody's decision to call it
PLUMBING = (
    os.sep + os.path.join("torch", "nn", "modules", "module.py"),  # nn.Module.__call__ -> forward
    os.sep + os.path.join("torch", "utils", "_contextlib.py"),  # torch.no_grad() & co. as decorators
    os.sep + os.path.join("transformers", "utils") + os.sep,  # deprecate_kwarg, can_return_tuple, ...
    os.sep + "functools.py", os.sep + "contextlib.py",
    "<frozen importlib.",  # an import of a deprecated name or module
)


def ours(filename: str) -> bool:
    path = os.path.abspath(filename) if filename and not filename.startswith("<") else (filename or "")
    return path.startswith(OUR_FOLDERS) and not path.endswith(os.sep + "conftest.py")


def responsible_caller(frames, filename: str, lineno: int):
    """(path, line) of the frame responsible for a warning, given the frames from the one that called
    ``warnings.warn`` outwards (see the comment above): ours when either candidate is ours, else the
    first candidate."""
    attributed = (filename, lineno)
    caller = None
    for frame in frames[1:]:  # frames[0] is the function that warned: the deprecated API itself
        name = frame.f_code.co_filename
        if not any(part in name for part in PLUMBING):
            caller = (name, frame.f_lineno)
            break
    for candidate in (attributed, caller):
        if candidate is not None and ours(candidate[0]):
            return candidate
    return caller or attributed


class OurDeprecations:
    """While active, records the FutureWarnings / DeprecationWarnings our code's calls raise (and
    passes every warning on to pytest's recording, so the summary is unchanged)."""

    def __init__(self):
        self.found = []

    def __enter__(self):
        self._previous = warnings.showwarning
        warnings.showwarning = self._show
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self._previous

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DEPRECATIONS):
            frames, frame = [], inspect.currentframe().f_back
            while frame is not None:  # from the frame that called warnings.warn outwards
                if frame.f_code.co_filename != warnings.__file__:
                    frames.append(frame)
                frame = frame.f_back
            where, at = responsible_caller(frames, filename, lineno)
            if ours(where):
                self.found.append(f"{category.__name__} from our call at {os.path.relpath(where, REPO)}:{at}: {message}")
        self._previous(message, category, filename, lineno, file, line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _fail_on_our_deprecations())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _fail_on_our_deprecations())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    return (yield from _fail_on_our_deprecations())


def _fail_on_our_deprecations():
    with OurDeprecations() as recorder:
        result = yield
    if recorder.found:
        unique = list(dict.fromkeys(recorder.found))
        pytest.fail("a deprecated API called by our code (fix the call):\n  " + "\n  ".join(unique), pytrace=False)
    return result


@pytest.fixture(autouse=True)
def restore_sigint():
    """Every test leaves SIGINT as it found it. An in-process fit (``main(["fit", ...])``, the demo)
    lets Lightning install its own SIGINT handling, and a subprocess started later inherits an
    ignored SIGINT, so Ctrl-C tests of other files running after it in the same worker never see
    the interrupt."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not handler:
        signal.signal(signal.SIGINT, handler)


def default_sigint() -> None:
    """``preexec_fn`` of a child whose Ctrl-C a test sends: SIGINT at its default, whatever this test
    process inherited or a library here set (an ignored SIGINT is inherited across exec, and Python
    then leaves it ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
