"""The chat page at / in a real headless Chromium (Playwright), against a tiny random model on a loopback port.

Needs Playwright and a Chromium: `pip install playwright`, then either `playwright install chromium` or
Debian's `apt-get install chromium` (used through `executable_path`). Without them the test is skipped and
says which is missing; docs/serve.md has the steps.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import openai
import pytest
import torch

from celeris.engine import load_engine
from celeris.serve import ModelWorker, create_app
from test_serve import make_tiny_dir, start_server

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")

KEY = "sk-celeris-browser"
MODEL = "tiny-chat"
PROMPT = "hello world, tell me about the quick brown fox"
MAX_TOKENS = 24


def chromium_path(p) -> str | None:
    """Playwright's own Chromium where `playwright install chromium` fetched it, else a system one."""
    own = Path(p.chromium.executable_path)
    if own.is_file():
        return None  # Playwright's default
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("no Chromium: run `playwright install chromium` or `apt-get install -y chromium`")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = load_engine(str(make_tiny_dir(tmp_path_factory.mktemp("page") / "tiny")), quantize="none", max_len=256,
                         progress=False)
    step = engine.decode_step

    def slow_step(tok):  # 30 ms a token: the chunks reach the page one by one, not in one network read
        time.sleep(0.03)
        return step(tok)

    engine.decode_step = slow_step
    url, thread, srv = start_server(create_app(ModelWorker(engine, max_queue=4, max_batch=1), MODEL, api_key=KEY))
    yield url
    srv.should_exit = True
    thread.join(10)
    torch.set_num_threads(threads)


def test_chat_page_streams_the_greedy_answer_into_the_page_and_shows_live_stats(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
    expected = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content
    assert expected
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(p))
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")  # the page stores the key and lists the model
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny-chat')")
            page.fill("#max_tokens", str(MAX_TOKENS))
            # The assistant bubble's text length each time the page changes it: streamed text grows in steps.
            page.evaluate("""() => { window.lengths = [];
                new MutationObserver(() => { const a = document.querySelector('.msg.assistant');
                                             if (a) window.lengths.push(a.textContent.length); })
                    .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
            page.fill("#prompt", PROMPT)
            page.press("#prompt", "Enter")
            page.wait_for_function("!document.getElementById('send').disabled && "
                                   "document.querySelector('.msg.assistant')?.textContent.length > 0", timeout=60_000)
            answer = page.inner_text(".msg.assistant")
            stats = page.inner_text("#stats")
            lengths = page.evaluate("window.lengths")
        finally:
            browser.close()
    assert page_text_equals(answer, expected)
    partial = {n for n in lengths if 0 < n < max(lengths)}
    assert len(partial) >= 3, f"the page showed the answer at lengths {lengths}: not streamed"
    assert "tokens/s" in stats and "tokens per target step" in stats and "first token" in stats


def page_text_equals(shown: str, expected: str) -> bool:
    """innerText trims and normalises the bubble's whitespace; compare the words."""
    return shown.split() == expected.split()
