"""The service's ``/docs`` page, rendered on the server from its OpenAPI schema: plain HTML, no script and no
external URL, so that it shows offline (FastAPI's Swagger UI loads its JavaScript and CSS from a CDN)."""

from __future__ import annotations

import html
from typing import Any

STYLE = """body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-top: 1px solid #ddd; padding-top: .8em; }
code, .path { font-family: ui-monospace, monospace; } .method { font-weight: 700; color: #fff; padding: .1em .45em;
border-radius: 3px; background: #2e7d32; } .method.post { background: #1565c0; }
table { border-collapse: collapse; margin: .4em 0 .8em; } td, th { border: 1px solid #ccc; padding: .25em .6em;
text-align: left; vertical-align: top; } th { background: #f4f4f4; } .sub { color: #666; }"""


def api_page(schema: dict[str, Any]) -> str:
    """HTML describing every path of ``schema`` (an OpenAPI 3 document): method, summary, parameters,
    request body fields and response fields."""
    info = schema.get("info", {})
    parts = [f"<h1>{html.escape(info.get('title', 'API'))} {html.escape(info.get('version', ''))}</h1>",
             f"<p>{html.escape(info.get('description', ''))}</p>",
             "<p class=sub>The machine-readable schema: <a href='openapi.json'>openapi.json</a>.</p>"]
    components = schema.get("components", {}).get("schemas", {})
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            parts.append(f"<h2><span class='method {method}'>{method.upper()}</span> "
                         f"<span class=path>{html.escape(path)}</span></h2>")
            text = operation.get("description") or operation.get("summary") or ""
            if text:
                parts.append(f"<p>{html.escape(text)}</p>")
            parameters = [(p["name"], p.get("in", ""), _type(p.get("schema", {}), components),
                           p.get("description") or p.get("schema", {}).get("description", ""),
                           "required" if p.get("required") else "optional")
                          for p in operation.get("parameters", [])]
            body = operation.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                for name, field, required in _fields(content.get("schema", {}), components):
                    parameters.append((name, media, _type(field, components), field.get("description", ""),
                                       "required" if required else "optional"))
            if parameters:
                parts.append(_table(["parameter", "where", "type", "meaning", ""], parameters))
            for status, response in operation.get("responses", {}).items():
                rows = []
                for content in response.get("content", {}).values():
                    rows = [(name, _type(field, components), "") for name, field, _ in
                            _fields(content.get("schema", {}), components)]
                parts.append(f"<p><b>{html.escape(status)}</b> {html.escape(response.get('description', ''))}</p>")
                if rows:
                    parts.append(_table(["field", "type", ""], rows))
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>"
            f"{html.escape(info.get('title', 'API'))} API</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def _resolve(schema: dict, components: dict) -> dict:
    while "$ref" in schema:
        schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
    return schema


def _fields(schema: dict, components: dict) -> list[tuple[str, dict, bool]]:
    schema = _resolve(schema, components)
    required = set(schema.get("required", []))
    return [(name, field, name in required) for name, field in schema.get("properties", {}).items()]


def _type(schema: dict, components: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_type(s, components) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}), components)}"
    kind = schema.get("type", "any")
    return "file" if schema.get("format") == "binary" else kind


def _table(header: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
