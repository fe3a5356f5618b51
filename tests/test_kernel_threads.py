"""Widget updates from the panels' background threads in a real ipykernel: the browser's next message for the widget
still reaches the kernel.

ipykernel 7.4 sends the browser's messages for a widget to the subshell of the request its last update answered, and
takes a thread's updates as answers to whichever request it handled last. When that request came on a subshell the
browser has deleted since (JupyterLab deletes its short-lived ones), every later click on the widget was dropped
("Unknown subshell_id" in the server log): the Features tab's table ignored a click under load.
"""
import ast
import queue
from pathlib import Path

import pytest

import mistudio.widgets as widgets_package

jupyter_client = pytest.importorskip("jupyter_client")
from jupyter_client.manager import start_new_kernel  # noqa: E402

# In the kernel: a widget, and a thread that updates it when told to (through the decorator or not)
SETUP = """
import threading
import ipywidgets as W
from mistudio.widgets.common import answers_no_request
box = W.IntText(value=0)
go, done = threading.Event(), threading.Event()
def update():
    go.wait(); box.description = 'from a thread'; done.set()
threading.Thread(target=answers_no_request(update) if DECORATED else update, daemon=True).start()
print(box.comm.comm_id)
"""


class Kernel:
    def __init__(self):
        self.manager, self.client = start_new_kernel(kernel_name="python3")
        self.updates: list[dict] = []  # the parent headers of the widget updates the kernel published

    def execute(self, code: str, subshell: str | None = None) -> str:
        msg = self.client.session.msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                                          "user_expressions": {}, "allow_stdin": False})
        if subshell:
            msg["header"]["subshell_id"] = subshell
        self.client.shell_channel.send(msg)
        printed = ""
        while True:
            reply = self.client.get_iopub_msg(timeout=60)
            if reply["msg_type"] == "comm_msg":
                self.updates.append(reply["parent_header"])
            if reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                continue
            if reply["msg_type"] == "stream":
                printed += reply["content"]["text"]
            elif reply["msg_type"] == "error":
                raise AssertionError("\n".join(reply["content"]["traceback"]))
            elif reply["msg_type"] == "status" and reply["content"]["execution_state"] == "idle":
                return printed

    def control(self, msg_type: str, content: dict) -> dict:
        self.client.control_channel.send(self.client.session.msg(msg_type, content))
        return self.client.control_channel.get_msg(timeout=60)["content"]

    def click(self, comm_id: str, state: dict) -> None:
        """What the browser sends when the user changes the widget (on the main shell)."""
        self.client.shell_channel.send(self.client.session.msg("comm_msg", {
            "comm_id": comm_id, "data": {"method": "update", "state": state, "buffer_paths": []}}))

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    kernel = Kernel()
    yield kernel
    kernel.close()


def test_a_click_after_a_threads_update_reaches_the_kernel(kernel):
    comm_id = kernel.execute("DECORATED = True\n" + SETUP).split()[-1]
    created = kernel.control("create_subshell_request", {})
    if created.get("status") != "ok":
        pytest.skip("this ipykernel has no subshells: nothing can be misrouted")
    subshell = created["subshell_id"]
    # the last request the kernel handles comes on a subshell (the widget manager's), which is then deleted
    kernel.execute("go.set(); done.wait(30)", subshell=subshell)
    assert kernel.control("delete_subshell_request", {"subshell_id": subshell})["status"] == "ok"
    kernel.click(comm_id, {"value": 7})
    assert kernel.execute("import time\nfor _ in range(100):\n    if box.value == 7: break\n    time.sleep(0.05)\n"
                          "print(box.value)").strip() == "7"
    # the thread's update reached the browser, answering no request
    assert {} in kernel.updates and not any(h.get("subshell_id") == subshell for h in kernel.updates)


def _background_callbacks() -> set[tuple[str, str]]:
    """(file, method) of every panel method run on a thread: a thread's or timer's target, or a job listener."""
    found = set()
    for path in Path(widgets_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            candidates = []
            if name == "Thread":
                candidates = [k.value for k in node.keywords if k.arg == "target"]
            elif name == "Timer" and len(node.args) >= 2:
                candidates = [node.args[1]]
            elif name == "subscribe" and node.args:
                candidates = [node.args[0]]
            for value in candidates:
                if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "self":
                    found.add((path.name, value.attr))
    return found


def test_every_panel_callback_run_on_a_thread_answers_no_request():
    callbacks = _background_callbacks()
    assert len(callbacks) >= 8  # the features task, the picker's lookup, the timers and the job listeners
    undecorated = []
    for file, method in sorted(callbacks):
        tree = ast.parse((Path(widgets_package.__file__).parent / file).read_text())
        definition = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == method)
        if not any(getattr(d, "id", None) == "answers_no_request" for d in definition.decorator_list):
            undecorated.append(f"{file}: {method}")
    assert not undecorated, f"decorate with @answers_no_request: {undecorated}"
