"""Where a notebook runs: one helper so the same cells work locally and on EMR.

``notebooks/fruits_pipeline.ipynb`` starts with::

    from stages.notebook import notebook_environment
    env = notebook_environment(globals())
    spark = env.spark

and shows each figure with a cell holding only ``%matplot plt``.

- **sparkmagic** (the PySpark kernel of JupyterHub or EMR Studio on the cluster): every
  cell runs in a Livy session on the driver, where Livy has already put a SparkSession
  named ``spark`` in the namespace.  It is used as it is: no second session, no local
  JVM.  ``%matplot plt`` is sparkmagic's own magic: Livy renders ``plt.gcf()`` to a
  PNG and the kernel shows it.
- **local** (an ipykernel, ``jupyter lab`` on a laptop, the tests): no ``spark`` yet,
  so :func:`stages.base.session.spark_session` starts one (local mode, the project's
  defaults), and a ``%matplot`` line magic doing what sparkmagic's does is registered
  in IPython.

Both use matplotlib's Agg backend: figures appear only through ``%matplot``, once,
never also through the inline backend's end-of-cell display.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, MutableMapping, Optional

__all__ = ["NotebookEnvironment", "notebook_environment", "render_figure"]

LOCAL = "local"
SPARKMAGIC = "sparkmagic"


@dataclass(frozen=True)
class NotebookEnvironment:
    """What :func:`notebook_environment` found.

    Attributes
    ----------
    kind : {"sparkmagic", "local"}
    spark : pyspark.sql.SparkSession
        Livy's ``spark`` (sparkmagic) or the one started here (local).
    matplot_magic : bool
        Whether ``%matplot`` was registered here (local IPython); under sparkmagic the
        kernel provides it.
    """

    kind: str
    spark: Any
    matplot_magic: bool

    def __str__(self) -> str:
        where = {
            SPARKMAGIC: "sparkmagic: the Livy session on the cluster",
            LOCAL: "local: a Spark session started by this notebook",
        }[self.kind]
        try:
            detail = f"Spark {self.spark.version}, master {self.spark.sparkContext.master}"
        except Exception:  # a session that cannot answer still says where it is
            detail = "Spark session"
        return f"{where} ({detail})"


def _is_spark_session(obj: Any) -> bool:
    # Duck-typed on what the notebook uses, so the check never imports pyspark's JVM side.
    return obj is not None and all(hasattr(obj, a) for a in ("sparkContext", "read", "version"))


def notebook_environment(
    namespace: MutableMapping[str, Any],
    app_name: str = "fruits-pipeline notebook",
    start_local: Optional[Callable[[str], Any]] = None,
    shell: Any = None,
) -> NotebookEnvironment:
    """Pick the notebook's Spark session and figure display for where it runs.

    Parameters
    ----------
    namespace : mutable mapping
        The notebook's ``globals()``.  A ``spark`` session already in it (Livy puts one
        there) means sparkmagic.
    app_name : str
        Name of a session started locally.
    start_local : callable, optional
        ``app_name -> SparkSession``; default :func:`stages.base.session.spark_session`.
    shell : IPython shell, optional
        Where to register ``%matplot``; default the running one (none under Livy).

    Returns
    -------
    NotebookEnvironment
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import matplotlib

    matplotlib.use("agg")
    predefined = namespace.get("spark")
    if _is_spark_session(predefined):
        return NotebookEnvironment(SPARKMAGIC, predefined, _register_matplot(shell))
    if start_local is None:
        from stages.base.session import spark_session as start_local
    spark = start_local(app_name)
    return NotebookEnvironment(LOCAL, spark, _register_matplot(shell))


def render_figure(pyplot_name: str, namespace: Mapping[str, Any]) -> bytes:
    """PNG bytes of the current figure of the pyplot module ``namespace[pyplot_name]``.

    What Livy's ``%matplot NAME`` does (``NAME.gcf()`` saved as PNG); the figure is then
    closed, so figures do not pile up in a long session.

    Raises
    ------
    NameError
        ``pyplot_name`` is not in the namespace.
    """
    name = pyplot_name.strip() or "plt"
    if name not in namespace:
        raise NameError(f"%matplot {name}: no {name!r} in the notebook (import matplotlib.pyplot)")
    pyplot = namespace[name]
    fig = pyplot.gcf()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot.close(fig)
    return buf.getvalue()


def _register_matplot(shell: Any) -> bool:
    """Register ``%matplot`` in a local IPython shell; ``False`` where there is none."""
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:  # Livy's Python has no IPython: sparkmagic owns %matplot there
            return False
        shell = get_ipython()
    if shell is None:
        return False

    def matplot(line: str) -> None:
        from IPython.display import Image, display

        display(Image(data=render_figure(line, shell.user_ns), format="png"))

    shell.register_magic_function(matplot, magic_kind="line", magic_name="matplot")
    return True
