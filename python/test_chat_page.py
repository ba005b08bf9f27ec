#!/usr/bin/env python3
"""Drives the chat page of a running `qwick serve` in headless Chromium (selenium): enters the
API key, sends a message, and checks that the answer streams in with a thinking block; then a
second message in the same conversation, a reload (the conversation is kept in the browser), and
the stop button (in a new conversation). Optionally saves a screenshot.

Usage: python3 python/test_chat_page.py --url http://127.0.0.1:PORT [--api-key KEY]
       [--screenshot FILE]
Run by crates/qwick-cli/tests/serve.rs when Chromium, ChromeDriver and selenium are installed
(the README's test command installs them).
"""

import argparse
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys


def wait_for(what, fn, timeout=60, on_timeout=lambda: ""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            v = fn()
            if v:
                return v
        except Exception:  # the page may be re-rendering
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} {on_timeout()}")


def set_value(driver, el_id, value):
    """Sets a field as a user would, with the change event the page listens to."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('change'))", el_id, value)


STREAM_VIEW_CHECK = r"""
const done = arguments[arguments.length - 1];
const reply = {role: "assistant", content: "", reasoning: "", streaming: true};
const el = messageEl(reply);
document.body.appendChild(el);
const view = streamView(reply, el);
// Count what is rendered as Markdown while 900 pieces stream in.
let rendered = 0;
const plain = markdown;
markdown = (s) => { rendered += s.length; return plain(s); };
for (let i = 0; i < 300; i++) {
  for (const piece of [`Paragraph ${i}, **bold** and a list:\n- a\n- b`, "\n\n",
                       i % 10 === 0 ? "```py\nx = 1\n\ny = 2\n```\n\n" : "1. one\n"]) {
    reply.content += piece;
    reply.reasoning += "think ";
    view.update();
  }
}
markdown = plain;
const ref = document.createElement("div");
ref.innerHTML = markdown(reply.content);
const parts = el.querySelector(".content").children;
const same = parts[0].innerHTML + parts[1].innerHTML === ref.innerHTML;
const thinking = el.querySelector("details.think .body").textContent === reply.reasoning;
// Many events within one frame render once.
const before = view.updates;
for (let i = 0; i < 100; i++) view.schedule();
requestAnimationFrame(() => requestAnimationFrame(() => {
  el.remove();
  done({same, thinking, rendered, total: reply.content.length, frameRenders: view.updates - before});
}));
"""


def check_stream_view(driver):
    """The streaming view: the same HTML as the whole answer's Markdown, finished blocks
    rendered once (what is rendered grows with the answer, not its square), one render per
    frame however many events arrive in it."""
    r = driver.execute_async_script(STREAM_VIEW_CHECK)
    assert r["same"], "the streamed view differs from the answer's Markdown"
    assert r["thinking"], "the streamed thinking text differs"
    assert r["rendered"] < 3 * r["total"], r
    assert r["frameRenders"] == 1, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--screenshot")
    a = ap.parse_args()
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,800"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(a.url + "/")
        assert driver.title == "qwick", driver.title
        check_stream_view(driver)
        if a.api_key:
            key = driver.find_element(By.ID, "apikey")
            key.send_keys(a.api_key)
            key.send_keys(Keys.TAB)
        wait_for("the model list", lambda: driver.find_elements(By.CSS_SELECTOR, "#model option"))
        # Thinking on with a small budget and few tokens, so the answer arrives quickly.
        set_value(driver, "budget", "4")
        set_value(driver, "maxtokens", "40")
        box = driver.find_element(By.ID, "input")
        box.send_keys("Why is the sky blue?")
        box.send_keys(Keys.ENTER)
        wait_for("the answer", lambda: driver.find_element(By.ID, "go").is_enabled()
                 and len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1)
        reply = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0]
        assert not reply.find_elements(By.CSS_SELECTOR, ".error"), reply.text
        think = reply.find_elements(By.CSS_SELECTOR, "details.think")
        assert think, "a thinking block"
        driver.execute_script("arguments[0].open = true", think[0])
        assert think[0].find_element(By.CSS_SELECTOR, ".body").text.strip(), "thinking text"
        assert reply.find_element(By.CSS_SELECTOR, ".content").text.strip(), "answer text"
        # A second turn, then a reload: the conversation is kept in the browser.
        box = driver.find_element(By.ID, "input")
        box.send_keys("And at sunset?")
        box.send_keys(Keys.ENTER)
        wait_for("the second answer", lambda: driver.find_element(By.ID, "go").is_enabled()
                 and len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2)
        driver.refresh()
        wait_for("the kept conversation", lambda: len(driver.find_elements(By.CSS_SELECTOR, ".msg")) == 4)
        # The stop button ends a long answer. The test model is fast: if an answer ends before
        # the click lands, try again.
        set_value(driver, "maxtokens", "")
        set_value(driver, "budget", "")
        for attempt in range(10):
            # A new conversation each time, so the context never fills.
            driver.find_element(By.ID, "new").click()
            box = driver.find_element(By.ID, "input")
            box.send_keys(f"Write a long story, part {attempt + 1}.")
            box.send_keys(Keys.ENTER)
            # On a loaded machine a whole answer can stream between two polls: then it has
            # ended (send button back, the answer shown) before the stop button was seen.
            wait_for("streaming to start or the answer to end",
                     lambda: driver.find_element(By.ID, "stop").is_enabled()
                     or (driver.find_element(By.ID, "go").is_enabled()
                         and len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) >= 1),
                     on_timeout=lambda: driver.find_element(By.ID, "status").text)
            if not driver.find_element(By.ID, "stop").is_enabled():
                continue
            driver.find_element(By.ID, "stop").click()
            wait_for("the stop", lambda: driver.find_element(By.ID, "go").is_enabled())
            if "stopped" in driver.find_element(By.ID, "status").text:
                break
        else:
            raise AssertionError("ten answers ended before the stop button was clicked")
        if a.screenshot:
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(a.screenshot)
        print("chat page: ok")
    finally:
        driver.quit()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        print(f"chat page: FAIL {e!r} {getattr(e, 'msg', '') or ''}")
        sys.exit(1)
