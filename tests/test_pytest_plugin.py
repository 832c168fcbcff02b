"""The pytest plugin's fixtures (mirrorfw_pair, mirrorfw_console with
--mirrorfw-console) on real controller processes, and the console client
after a streaming command: run() answers its own command, not the stream's
tail (it returned the previous command's output, forever, before the fix)."""

from __future__ import annotations

import pytest
from console_fakes import FakePrimary, LoopThread

from harness.console_client import ConsoleClient
from harness.console_session import start_console

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.mark.parametrize("kind", ["pty", "socket", "rfc2217"])
def test_run_after_a_stream_ended_by_a_blank_line_answers_its_own_command(loop, tmp_path, kind):
    fake = loop.call(FakePrimary)
    url = {"pty": f"pty://{tmp_path}/console", "socket": "socket://127.0.0.1:0",
           "rfc2217": "rfc2217://127.0.0.1:0"}[kind]
    server = loop.run(start_console(url, fake))
    try:
        with ConsoleClient(server.url, timeout_s=10) as client:
            client.sendline("events")
            client.expect("exists -\r\n")
            loop.run(fake.run())
            client.expect("create cg seq:1")  # the rest of the CG's events stay unread
            client.sendline("")  # ends the stream; its prompt is on the way
            assert client.run_check("set cg_interval_s 2") == ["cg_interval_s = 2.0"]
            assert client.run_json("status")["data"]["cg_interval_s"] == 2.0
            assert client.run_check("set cg_interval_s 3") == ["cg_interval_s = 3.0"]
            # A raw command whose prompt was read by the caller leaves run() in step too.
            client.sendline("set cg_interval_s 4")
            client.expect(client.prompt)
            assert client.run_check("set cg_interval_s 5") == ["cg_interval_s = 5.0"]
    finally:
        loop.run(server.close())


def test_mirrorfw_pair_replicates_and_mirrorfw_console_attaches(pytester, tmp_path, monkeypatch):
    """A test written against the plugin, run by pytest as a user would: the
    pair fixture, then the console fixture given the pair's --mirrorfw-console URL."""
    pytester.makepyfile(test_user="""
        import asyncio, os, time
        from drivers import open_device

        def test_pair(mirrorfw_pair):
            pri = mirrorfw_pair.consoles["primary"]
            sec = mirrorfw_pair.consoles["secondary"]
            assert pri.run_json("status")["data"]["link"] == "up"
            dev = open_device(mirrorfw_pair.nbd_url())
            asyncio.run(dev.write(0, os.urandom(65536), fua=True))
            dev.close()
            before = pri.run_json("status")["data"]["total_successful_cgs"]
            pri.run_check("cg run")
            deadline = time.monotonic() + 30  # cg run returns while the CG commits
            while pri.run_json("status")["data"]["total_successful_cgs"] <= before:
                assert time.monotonic() < deadline, pri.run_json("status")
                time.sleep(0.1)
            assert sec.run_json("status")["ok"]
            with open(os.environ["CONSOLE_OUT"], "w") as f:
                f.write(mirrorfw_pair.addresses["primary"]["console"])

        def test_console_skips_without_url(mirrorfw_console):
            raise AssertionError("not reached")
    """)
    out = tmp_path / "console.url"
    monkeypatch.setenv("CONSOLE_OUT", str(out))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    assert out.read_text().startswith("socket://127.0.0.1:")


def test_mirrorfw_console_option_attaches_to_a_running_controller(pytester, loop, tmp_path):
    fake = loop.call(FakePrimary)
    server = loop.run(start_console("rfc2217://127.0.0.1:0", fake))
    try:
        pytester.makepyfile(test_attached="""
            def test_status(mirrorfw_console):
                assert mirrorfw_console.run_json("status")["data"]["copy_state"] == "Running"
                mirrorfw_console.sendline("events")
                mirrorfw_console.expect("exists -")
                mirrorfw_console.sendline("")
                assert mirrorfw_console.run_check("set cg_interval_s 7") == ["cg_interval_s = 7.0"]
        """)
        result = pytester.runpytest_subprocess("-p", "no:randomly", "--mirrorfw-console", server.url)
        result.assert_outcomes(passed=1)
    finally:
        loop.run(server.close())
