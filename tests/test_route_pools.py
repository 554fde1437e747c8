"""The upstreams file -> Routing: names, aliases, the single-model rule, per-key models,
URL normalisation, one-line errors naming file/table/field, reload diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamacpp_proxy.errors import InvalidRequest, ModelNotFound
from llamacpp_proxy.route.pools import (
    Routing,
    UpstreamsFileError,
    load_upstreams_file,
    parse_key_models,
    parse_server_url,
    routing_from_servers,
)

ISSUE_EXAMPLE = """
[models."qwen2.5-7b"]                 # the name clients send as "model"
servers = ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]
aliases = ["gpt-4o-mini"]             # optional other names for the same pool
chat_template = "qwen2.5"             # optional; else the servers' own (/props)

[models."coder"]
servers = ["http://10.0.0.3:8080"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> Routing:
    return load_upstreams_file(write(tmp_path, text))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(UpstreamsFileError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "upstreams.toml"))
    return message


def test_the_issue_example_parses_into_pools_by_name_and_alias(tmp_path: Path) -> None:
    routing = load(tmp_path, ISSUE_EXAMPLE)
    qwen = routing.lookup("qwen2.5-7b")
    assert [s.url for s in qwen.servers] == ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]
    assert qwen.chat_template == "qwen2.5"
    assert routing.lookup("gpt-4o-mini") is qwen
    assert routing.lookup("coder").chat_template is None
    assert routing.model_ids() == ["qwen2.5-7b", "gpt-4o-mini", "coder"]
    assert routing.single is None


def test_unknown_model_is_a_404_model_not_found_on_param_model(tmp_path: Path) -> None:
    routing = load(tmp_path, ISSUE_EXAMPLE)
    with pytest.raises(ModelNotFound) as info:
        routing.lookup("gpt-5")
    body = info.value.body()["error"]
    assert info.value.status == 404
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "gpt-5" in body["message"]


def test_with_several_models_a_request_must_name_one(tmp_path: Path) -> None:
    routing = load(tmp_path, ISSUE_EXAMPLE)
    with pytest.raises(InvalidRequest) as info:
        routing.lookup(None)
    assert info.value.param == "model"


def test_a_single_model_serves_any_or_no_name(tmp_path: Path) -> None:
    routing = load(tmp_path, '[models.only]\nservers = ["http://a:1"]\n')
    pool = routing.lookup("only")
    assert routing.lookup("gpt-4o") is pool
    assert routing.lookup(None) is pool
    assert routing.lookup("") is pool


def test_server_flags_make_one_pool_that_serves_any_name() -> None:
    routing = routing_from_servers(["http://h1:8080/", "http://h2:8080"])
    assert [s.url for s in routing.lookup("whatever").servers] == [
        "http://h1:8080",
        "http://h2:8080",
    ]
    with pytest.raises(UpstreamsFileError, match="already listed"):
        routing_from_servers(["http://h1:8080", "http://H1:8080/"])


def test_key_models_limit_which_pools_a_key_sees_and_uses(tmp_path: Path) -> None:
    routing = load(tmp_path, ISSUE_EXAMPLE)
    allowed = parse_key_models(["gpt-4o-mini"], "keys.toml: [keys.alice]")
    assert allowed == frozenset({"gpt-4o-mini"})
    # An alias grants its pool under every name: it is the same model.
    assert routing.lookup("qwen2.5-7b", allowed).name == "qwen2.5-7b"
    with pytest.raises(ModelNotFound) as forbidden:
        routing.lookup("coder", allowed)
    with pytest.raises(ModelNotFound) as unknown:
        routing.lookup("nope", allowed)
    # Forbidden and unknown read the same, so a key cannot probe what exists.
    assert forbidden.value.body()["error"]["message"].replace("coder", "X") == unknown.value.body()[
        "error"
    ]["message"].replace("nope", "X")
    assert routing.model_ids(allowed) == ["qwen2.5-7b", "gpt-4o-mini"]
    assert parse_key_models(None, "k") is None
    assert routing.unknown_models(["coder", "llama-70b"]) == ["llama-70b"]


def test_key_models_limit_even_the_single_model(tmp_path: Path) -> None:
    routing = load(tmp_path, '[models.only]\nservers = ["http://a:1"]\n')
    with pytest.raises(ModelNotFound):
        routing.lookup("anything", frozenset({"other"}))
    assert routing.lookup("anything", frozenset({"only"})).name == "only"


@pytest.mark.parametrize(
    "value, fragment",
    [
        ([], "non-empty list"),
        ("qwen", "non-empty list"),
        ([""], "models[0]"),
        (["ok", 3], "models[1]"),
    ],
)
def test_bad_key_models_name_the_entry(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=r"keys\.toml: \[keys\.bob\]") as info:
        parse_key_models(value, "keys.toml: [keys.bob]")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text, url, display",
    [
        ("http://10.0.0.1:8080", "http://10.0.0.1:8080", "10.0.0.1:8080"),
        ("HTTP://Host.Example/", "http://host.example:80", "host.example:80"),
        ("https://h", "https://h:443", "h:443"),
        ("http://[::1]:8080/base/", "http://[::1]:8080/base", "[::1]:8080"),
        ("http://user:s3cret@h:1", "http://user:s3cret@h:1", "h:1"),
    ],
)
def test_server_urls_are_normalised_and_displayed_without_credentials(
    text: str, url: str, display: str
) -> None:
    server = parse_server_url(text, "f")
    assert server.url == url
    assert server.display == display
    assert "s3cret" not in server.key and "s3cret" not in repr(server)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("ftp://h:1", "http:// or https://"),
        ("h:8080", "http:// or https://"),
        ("http://", "no host"),
        ("http://h:99999", "bad server URL"),
        ("http://h:1/?x=1", "?query"),
        ("http://h :1", "spaces"),
        (3, "URL string"),
    ],
)
def test_bad_server_urls_are_refused_with_the_table_and_index(
    tmp_path: Path, text: object, fragment: str
) -> None:
    value = f'"{text}"' if isinstance(text, str) else str(text)
    message = error_of(tmp_path, f"[models.m]\nservers = [{value}]\n")
    assert '[models."m"] servers[0]' in message and fragment in message


def test_credentials_of_a_bad_url_never_reach_the_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[models.m]\nservers = ["ftp://u:hunter2@h:1"]\n')
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("", ['[models."NAME"]']),
        ("x = 1\n[models.m]\nservers=['http://a:1']", ["unknown top-level keys: x"]),
        ("[models.m]\n", ['[models."m"] servers', "missing"]),
        ("[models.m]\nservers = []", ["non-empty list"]),
        ("[models.m]\nservers = ['http://a:1']\nweight = 2", ["unknown fields: weight"]),
        ("[models.m]\nservers = ['http://a:1']\naliases = 'x'", ["aliases", "list of names"]),
        ("[models.m]\nservers = ['http://a:1']\nchat_template = 3", ["chat_template"]),
        (
            "[models.a]\nservers = ['http://h:1']\n[models.b]\nservers = ['http://H:1/']",
            ['[models."b"] servers[0]', 'h:1 is already listed in [models."a"]', "aliases"],
        ),
        (
            "[models.a]\nservers = ['http://h:1', 'http://h:1']",
            ["servers[1]", "already listed in this model"],
        ),
        (
            "[models.a]\nservers = ['http://h:1']\naliases = ['b']\n[models.b]\nservers = ['http://h:2']",
            ['[models."b"]', 'already an alias in [models."a"]'],
        ),
        (
            "[models.a]\nservers = ['http://h:1']\n[models.b]\nservers = ['http://h:2']\naliases = ['a']",
            ['[models."b"] aliases[0]', "'a' is already a name in [models.\"a\"]"],
        ),
        ("[models.a]\nservers = ['http://h:1']\naliases = ['a']", ["aliases[0]", "already"]),
        ('[models."bad\\u0001"]\nservers = ["http://h:1"]', ["control characters"]),
        ("[models.a\nservers = 1", ["not valid TOML"]),
        ("models = 3", ['[models."NAME"]']),
        ("[models]\na = 3", ["must be a table"]),
    ],
)
def test_every_mistake_is_one_line_naming_file_table_and_field(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    message = error_of(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, message


def test_an_unreadable_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(UpstreamsFileError, match="cannot read"):
        load_upstreams_file(tmp_path / "missing.toml")


def test_a_reload_diff_names_added_removed_and_moved_servers(tmp_path: Path) -> None:
    old = load(tmp_path, ISSUE_EXAMPLE)
    new = load(
        tmp_path,
        """
[models."qwen2.5-7b"]
servers = ["http://10.0.0.1:8080/", "http://10.0.0.4:8080"]
[models."coder"]
servers = ["http://10.0.0.2:8080"]
""",
    )
    diff = old.diff(new)
    assert [s.display for s in diff.added] == ["10.0.0.4:8080"]
    assert [s.display for s in diff.removed] == ["10.0.0.3:8080"]
    assert [s.display for s in diff.moved] == ["10.0.0.2:8080"]
    assert old.diff(old).added == old.diff(old).removed == ()
