"""`alignflow annotate`: the real server, driven by the real page in headless Chromium (Debian's chromium and
chromium-driver, through Selenium), then its answers read by the preferences and compare stages.

- rank one item with the keyboard, skip one, A/B another, kill the server (SIGKILL), restart: the logs hold
  exactly those events and each annotator resumes where they stopped; undo after the restart;
- bad requests (unknown item, not a permutation, malformed / oversized body, bad name, foreign Host, missing
  token) get a 4xx and leave the logs byte for byte as they were;
- the human judge reads the logs (undo, stale answers, agreement); agreement statistics on known cases;
- the whole loop in a git + DVC repository: samples, rankings in the browser, reward model and DPO on the
  human pairs, A/B answers in the browser, compare's human win rates, all recorded in dvc.lock.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.request import urlopen

import pytest
import yaml

from alignflow.core.annotation_log import between_annotators, cohen_kappa, text_hash
from conftest import alignflow, call, events, kill, make_repo, server, sh, tiny_params, write_params

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOTS = os.environ.get("ALIGNFLOW_SCREENSHOTS")  # a folder: keep the screenshots (the README's come from here)


# --- the server and the browser ---


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through its chromedriver; no network, no first-run or background requests."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), "install Debian's chromium and chromium-driver: bash setup.sh test"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def progress(driver) -> str:
    return driver.find_element("id", "progress").text


def log_in(driver, url: str, name: str) -> None:
    driver.get(url)
    box = driver.find_element("id", "name")
    box.clear()
    box.send_keys(name + "\n")
    wait_for(driver, lambda d: "done" in progress(d))


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def press_shifted(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(driver).key_down(Keys.SHIFT).send_keys(key).key_up(Keys.SHIFT).perform()


def shown_keys(driver) -> list[str]:
    return [li.get_attribute("data-key") for li in driver.find_elements("css selector", "#options li")]


def current_text(driver) -> str:
    return driver.find_element("id", "prompt").text


def screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))


# --- a small batch to annotate ---

ANSWERS = ["A clear, complete answer to the question, with one example.", "A short answer.",
           "fruit fruit fruit fruit fruit fruit fruit", "I'm sorry, but I can't help with that."]


@pytest.fixture
def annotate_dir(tmp_path, tiny_model_dir):
    """params.yaml (tiny), three prompts with four responses each, and two models' answers to four prompts."""
    write_params(tmp_path, tiny_params(tiny_model_dir))
    samples = tmp_path / "data" / "preferences" / "samples.jsonl"
    samples.parent.mkdir(parents=True)
    samples.write_text("".join(json.dumps({
        "prompt_id": f"p{i}", "source_id": f"s{i}", "prompt": [{"role": "user", "content": f"Question number {i}?"}], "harmful": False,
        "responses": [{"id": f"p{i}r{j}", "text": f"{text} ({i})"} for j, text in enumerate(ANSWERS)]}) + "\n" for i in range(3)))
    folder = tmp_path / "data" / "evaluation"
    folder.mkdir(parents=True)
    for model in ("sft", "dpo"):
        rows = [{"id": f"e{i}", "prompt": f"Prompt {i}?", "response": f"{model} says {i}" if i != 3 else "the same answer",
                 "reward": 0.0} for i in range(4)]
        (folder / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_rank_and_ab_in_the_browser_survive_a_kill(annotate_dir, browser):
    log = annotate_dir / "data" / "annotations" / "ana.jsonl"
    with server(annotate_dir, "rank") as (proc, url):
        log_in(browser, url, "ana")
        assert progress(browser) == "0 / 3 done"
        first_prompt, k = current_text(browser), shown_keys(browser)
        assert sorted(k) == [f"p{first_prompt[-2]}r{j}" for j in range(4)]  # the item's four responses ...
        # ... ordered with the keyboard: 2nd card up to the top, the last marked unacceptable, the 3rd to place 1
        press(browser, "\ue015")  # ArrowDown: the second card
        press_shifted(browser, "\ue013")  # Shift+ArrowUp: moves it up
        assert shown_keys(browser) == [k[1], k[0], k[2], k[3]]
        press(browser, "\ue015", "\ue015", "\ue015", "x", "\ue013", "1")
        assert shown_keys(browser) == [k[2], k[1], k[0], k[3]]
        assert "unacceptable" in browser.find_elements("css selector", "#options li")[3].text
        screenshot(browser, "annotate-rank.png")
        press(browser, "\ue007")  # Enter submits
        wait_for(browser, lambda d: progress(d) == "1 / 3 done")
        second_prompt = current_text(browser)
        press(browser, "s")  # skip the second item
        wait_for(browser, lambda d: progress(d) == "1 / 3 done · 1 skipped")
        third_prompt = current_text(browser)
        assert len({first_prompt, second_prompt, third_prompt}) == 3
        kill(proc)  # no goodbye: SIGKILL

    answer, skip = events(log)
    assert answer["event"] == "answer" and answer["shown"] == k and answer["annotator"] == "ana"
    assert answer["ranking"] == [k[2], k[1], k[0], [k[3]]] and answer["unacceptable"] == [k[3]] and answer["seconds"] > 0
    assert skip["event"] == "skip" and skip["item"] != answer["item"]

    with server(annotate_dir, "rank") as (proc, url):  # a new server, a new port: the page resumes from the log
        log_in(browser, url, "ana")
        assert progress(browser) == "1 / 3 done · 1 skipped" and current_text(browser) == third_prompt
        press(browser, "u")  # undo the last answer: the first item comes back
        wait_for(browser, lambda d: progress(d) == "0 / 3 done · 1 skipped")
        assert current_text(browser) == first_prompt
        log_in(browser, url, "bo")  # another annotator starts from the beginning, with the responses in another order
        assert progress(browser) == "0 / 3 done" and current_text(browser) == first_prompt
    assert [e["event"] for e in events(log)] == ["answer", "skip", "undo"] and events(log)[2]["undoes"] == answer["id"]

    ab_log = annotate_dir / "data" / "ab_annotations" / "cy.jsonl"
    with server(annotate_dir, "ab", "dpo") as (proc, url):
        log_in(browser, url, "cy")
        assert progress(browser) == "0 / 3 done"  # e3's answers are identical: a tie, not asked
        sides = {s: browser.find_element("css selector", f"#side{s} .text").text for s in "AB"}
        screenshot(browser, "annotate-ab.png")
        press(browser, "b")
        wait_for(browser, lambda d: progress(d) == "1 / 3 done")
        kill(proc)
    (record,) = events(ab_log)
    winner = record["shown"]["B"]
    assert record["answer"] == "B" and record["models"] == ["dpo", "sft"] and sides["B"].startswith(f"{winner} says")
    assert record["texts"][winner] == text_hash(sides["B"])
    with server(annotate_dir, "ab", "dpo") as (proc, url):
        log_in(browser, url, "cy")
        assert progress(browser) == "1 / 3 done"


DRAG = """const [from, to] = arguments; const data = new DataTransfer();
for (const [el, type] of [[from, "dragstart"], [to, "dragover"], [to, "drop"]])
  el.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));"""


def test_rank_by_dragging(annotate_dir, browser):
    """Drag and drop (the page's HTML5 handlers, fed the browser's own DragEvents): the last card onto the first."""
    with server(annotate_dir, "rank") as (proc, url):
        log_in(browser, url, "dee")
        k = shown_keys(browser)
        cards = browser.find_elements("css selector", "#options li")
        browser.execute_script(DRAG, cards[3], cards[0])
        assert shown_keys(browser) == [k[3], k[0], k[1], k[2]]
        browser.find_element("id", "submit").click()
        wait_for(browser, lambda d: progress(d) == "1 / 3 done")
    (answer,) = events(annotate_dir / "data" / "annotations" / "dee.jsonl")
    assert answer["ranking"] == [k[3], k[0], k[1], k[2]] and answer["unacceptable"] == []


def test_bad_requests_get_4xx_and_write_nothing(annotate_dir):
    with server(annotate_dir, "rank") as (proc, url):
        status, view = call(url, "/api/view?annotator=ana")
        item, keys = view["item"]["id"], [o["key"] for o in view["item"]["options"]]
        assert call(url, "/api/answer", {"annotator": "ana", "item": item, "ranking": keys})[0] == 200
        log = annotate_dir / "data" / "annotations" / "ana.jsonl"
        before = log.read_bytes()
        _, view = call(url, "/api/view?annotator=ana")
        item, keys = view["item"]["id"], [o["key"] for o in view["item"]["options"]]
        bad = [
            ({"annotator": "ana", "item": "nope", "ranking": keys}, 404, "not an item of this batch"),
            ({"annotator": "ana", "item": item, "ranking": keys[:-1]}, 400, "exactly once"),
            ({"annotator": "ana", "item": item, "ranking": [keys[0]] * len(keys)}, 400, "exactly once"),
            ({"annotator": "ana", "item": item, "ranking": keys, "unacceptable": [keys[0]]}, 400, "must come last"),
            ({"annotator": "ana", "item": item, "ranking": keys, "seconds": "soon"}, 400, "'seconds'"),
            ({"annotator": "../../etc/passwd", "item": item, "ranking": keys}, 400, "'annotator'"),
            ({"annotator": "ana", "item": events(log)[0]["item"], "ranking": keys}, 409, "already answered"),
            (b"{not json", 400, "malformed JSON"),
            (b"[1, 2]", 400, "JSON object"),
            (b"\xff\xfe", 400, "malformed JSON"),
            (b"x" * (64 * 1024 + 1), 413, "over the limit"),
        ]
        for body, status, message in bad:
            got, reply = call(url, "/api/answer", body)
            assert (got, message in reply["error"]) == (status, True), (body[:80], got, reply)
        assert call(url, "/api/undo", {"annotator": "bo"})[0] == 409  # nothing to undo
        assert call(url, "/api/view?annotator=ana", headers={"Host": "attacker.example:80"})[0] == 403  # DNS rebinding
        assert call(url, "/api/nothing")[0] == 404
        assert log.read_bytes() == before and not (log.parent / "bo.jsonl").exists()

    with server(annotate_dir, "rank", "--host", "0.0.0.0") as (proc, url):  # bound to every interface: a token
        assert re.search(r"\?token=[\w-]{16,}$", url)
        token = url.split("token=")[1]
        base = url.split("?")[0].replace("0.0.0.0", "127.0.0.1")
        assert call(base, "/api/view?annotator=ana")[0] == 403
        assert call(base, "/api/view?annotator=ana&token=wrong")[0] == 403
        status, view = call(base, f"/api/view?annotator=ana&token={token}")
        assert status == 200 and view["done"] == 1
        with urlopen(f"{base}/?token={token}", timeout=10) as page:
            assert b"alignflow annotate" in page.read()


def test_human_judge_reads_the_logs(annotate_dir):
    """Rankings from the annotate logs (an undone answer does not count, a stale one is left out), pairs by
    majority, agreement between annotators and with the rules judge in the metrics."""
    params = yaml.safe_load((annotate_dir / "params.yaml").read_text())
    params["preferences"].update(judge="human", agreement_judge="rules", rules_min_tokens=4, max_pairs_per_prompt=None)
    write_params(annotate_dir, params)
    folder = annotate_dir / "data" / "annotations"
    folder.mkdir(parents=True)

    def answer(n, who, item, ranking):
        return {"event": "answer", "mode": "rank", "id": f"{who}-{n}", "annotator": who, "time": "t", "item": item,
                "ranking": ranking, "unacceptable": []}

    ana = [answer(1, "ana", "p0", ["p0r1", "p0r0"]),  # undone below: does not count
           {"event": "undo", "mode": "rank", "id": "ana-2", "annotator": "ana", "time": "t", "undoes": "ana-1"},
           answer(3, "ana", "p0", ["p0r0", "p0r1", ["p0r2", "p0r3"]]),
           answer(4, "ana", "old", ["x", "y"])]  # a prompt no longer sampled: stale
    bo = [answer(1, "bo", "p0", ["p0r0", "p0r2", "p0r1"])]  # agrees on r0 > r1, r0 > r2; disagrees on r1 vs r2
    for who, records in (("ana", ana), ("bo", bo)):
        (folder / f"{who}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = alignflow("preferences", annotate_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ana.jsonl:4: a ranking of responses no longer in" in result.stderr and "left out" in result.stderr
    metrics = json.loads((annotate_dir / "metrics" / "preferences.json").read_text())
    assert metrics["rankings"] == 2 + 0 and metrics["annotators"] == 2 and metrics["stale_rankings"] == 1
    between = metrics["agreement_between_annotators"]
    assert between["shared"] == 3 and between["agreement"] == pytest.approx(2 / 3)
    # people prefer r0 > r1, r0 > r2, r0 > r3, r1 > r3 (r1 vs r2 tied 1:1); the rules judge ties r0 and r1 (both
    # pass every check) and sides with people on the other three; kappa is undefined when everyone says "+1"
    assert metrics["agreement_with_rules_judge"] == {"shared": 3, "agreement": 1.0, "kappa": None}
    pairs = [json.loads(line) for line in (annotate_dir / "data" / "preferences" / "pairs.jsonl").read_text().splitlines()]
    got = {(p["chosen"][:8], p["rejected"][:8]) for p in pairs}
    a, s, r = ANSWERS[0][:8], ANSWERS[1][:8], ANSWERS[2][:8]
    assert (a, s) in got and (a, r) in got and (s, r) not in got and (r, s) not in got  # r1 vs r2: 1 vote each, a tie


def test_agreement_statistics():
    assert cohen_kappa([("a", "a"), ("b", "b")]) == 1.0
    assert cohen_kappa([("a", "b"), ("b", "a")]) == -1.0
    assert cohen_kappa([("win", "win"), ("win", "tie"), ("loss", "loss"), ("tie", "tie")]) == pytest.approx((0.75 - 0.34375) / (1 - 0.34375))
    result = between_annotators({"x": {1: "win", 2: "tie"}, "y": {1: "win", 2: "loss", 3: "win"}, "z": {3: "win"}})
    assert result["shared"] == 3 and result["agreement"] == pytest.approx(2 / 3)
    assert result["pairs_of_annotators"] == {"x|y": {"shared": 2, "agreement": 0.5}, "y|z": {"shared": 1, "agreement": 1.0}}


def arrange(driver, desired: list[str]) -> None:
    """Put the cards in `desired` order with the keyboard only: arrows to reach a card, its place's digit to move it."""
    selected = 0
    for place, key in enumerate(desired):
        index = shown_keys(driver).index(key)
        press(driver, *(["\ue015"] * (index - selected) if index >= selected else ["\ue013"] * (selected - index)))
        press(driver, str(place + 1))
        selected = place
    assert shown_keys(driver) == desired


@pytest.mark.slow(seconds=350)
def test_human_feedback_loop_recorded_by_dvc(tmp_path, tiny_model_dir, browser):
    """The issue's "done when": sample, rank in the browser, reward model and DPO on the human pairs, A/B in the
    browser, human win rates in the evaluation; every step a DVC stage or a DVC dependency."""
    params = tiny_params(tiny_model_dir, preferences__judge="human", preferences__agreement_judge="ai")
    params["alignment"]["methods"] = ["dpo"]
    params["evaluate"]["models"] = {"sft": "models/sft", "dpo": "models/aligned/dpo"}
    params["dpo"].update(learning_rate=0.05, epochs=3)  # 12 pairs: a large step, so DPO's greedy answers differ from SFT's
    repo = make_repo(tmp_path / "repo", params)
    sh(["dvc", "repro", "samples"], repo)

    with server(repo, "rank", "--limit", "3") as (proc, url):
        for name in ("ana", "bo"):  # both put the longer responses first; bo also marks the shortest unacceptable once
            log_in(browser, url, name)
            for n in range(3):
                texts = {li.get_attribute("data-key"): li.find_element("css selector", ".text").text
                         for li in browser.find_elements("css selector", "#options li")}
                desired = sorted(texts, key=lambda k: (-len(texts[k]), k))
                arrange(browser, desired)
                if name == "bo" and n == 0:
                    press(browser, *(["\ue015"] * (len(desired) - 1)), "x")
                press(browser, "\ue007")
                wait_for(browser, lambda d, n=n: progress(d).startswith(f"{n + 1} / 3 done"))
    sh(["git", "add", "data/annotations"], repo)
    sh(["dvc", "repro"], repo)
    prefs = json.loads((repo / "metrics" / "preferences.json").read_text())
    assert prefs["judge"] == "human" and prefs["annotators"] == 2 and prefs["rankings"] == 6 and prefs["stale_rankings"] == 0
    assert prefs["agreement_between_annotators"]["agreement"] == 1.0  # the same order wherever both ordered strictly
    assert prefs["agreement_with_ai_judge"]["shared"] >= 0 and prefs["pairs"] > 0
    pairs = [json.loads(line) for line in (repo / "data" / "preferences" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["judge"]["kind"] == "human" and len(p["chosen"]) >= len(p["rejected"]) for p in pairs)
    summary = json.loads((repo / "metrics" / "evaluation.json").read_text())
    assert summary["models"]["dpo"]["judged_by"] == "rules (no human A/B answers for this model)"

    answers = ["a", "b", "t", "a"]
    with server(repo, "ab", "dpo", "--limit", str(len(answers))) as (proc, url):
        log_in(browser, url, "ana")
        for n, key in enumerate(answers):
            press(browser, key)
            wait_for(browser, lambda d, n=n: progress(d).startswith(f"{n + 1} / {len(answers)} done"))
    sh(["git", "add", "data/ab_annotations"], repo)
    ran = set(re.findall(r"Running stage '([\w@]+)'", sh(["dvc", "repro"], repo).stdout))
    assert ran == {"compare", "report"}  # A/B answers touch the evaluation only
    dpo = json.loads((repo / "metrics" / "evaluation.json").read_text())["models"]["dpo"]
    outcome = {"dpo": "win", "sft": "loss", None: "tie"}
    logged = [outcome[e["winner"]] for e in events(repo / "data" / "ab_annotations" / "ana.jsonl")]
    sft_rows = [json.loads(line) for line in (repo / "data" / "evaluation" / "sft.jsonl").read_text().splitlines()]
    dpo_rows = [json.loads(line) for line in (repo / "data" / "evaluation" / "dpo.jsonl").read_text().splitlines()]
    identical = sum(a["response"] == b["response"] for a, b in zip(sft_rows, dpo_rows))
    n = len(answers) + identical
    assert dpo["judged_by"] == "human" and dpo["comparisons"] == n
    assert (dpo["win_rate"]["value"], dpo["tie_rate"]["value"], dpo["loss_rate"]["value"]) == pytest.approx(
        (logged.count("win") / n, (logged.count("tie") + identical) / n, logged.count("loss") / n))
    assert dpo["human"]["answers"] == len(answers) and dpo["human"]["agreement_with_ai_judge"]["shared"] == len(answers)
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert any(d["path"] == "data/annotations" for d in lock["preferences"]["deps"])
    assert any(d["path"] == "data/ab_annotations" for d in lock["compare"]["deps"])
