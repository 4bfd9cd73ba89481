"""Every generated message survives a binary round trip with every field set.

For each message type of every generated module (nested ones such as nsp.v1.Conduit.PortNat
included; map entry types are covered through the map field of their parent), an instance is
built by walking its descriptor: every scalar non-default, every enum non-zero, sub-messages
populated recursively down to MAX_DEPTH (present but empty below it), repeated fields with two
elements and maps with two entries. It is serialized, parsed back, compared, and checked again
field by field, so a field that does not survive the wire fails with its path.

Checked that it can fail: parsing a populated nsp.v1.Gateway from bytes truncated before field 13
reports "nsp.v1.Gateway.bgpAuth (#13): not present"; making _scalar() return 0 for uint32 fails
every message with a uint32 field ("...: not present", since proto3 does not send zeros).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any, cast

import pytest
from google.protobuf import message_factory, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

import proxy.api

MAX_DEPTH = 6


def _walk(messages: list[Descriptor]) -> Iterator[Descriptor]:
    for message in messages:
        if message.GetOptions().map_entry:
            continue
        yield message
        yield from _walk(list(message.nested_types))


def _all_messages() -> dict[str, Descriptor]:
    names = [m.name for m in pkgutil.walk_packages(proxy.api.__path__, "proxy.api.")]
    found: dict[str, Descriptor] = {}
    for name in sorted(n for n in names if n.endswith("_pb2")):
        fd = importlib.import_module(name).DESCRIPTOR
        for message in _walk(list(fd.message_types_by_name.values())):
            found[message.full_name] = message
    return found


MESSAGES = _all_messages()


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _fields(msg: Message) -> list[FieldDescriptor]:
    # The stubs type Message.DESCRIPTOR as a union with upb's classes; it is a Descriptor.
    return list(cast(Descriptor, msg.DESCRIPTOR).fields)


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and _message_type(field).GetOptions().map_entry
        and field.is_repeated
    )


_INT32 = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32)
_UINT32 = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32)
_INT64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64)
_UINT64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)


def _scalar(field: FieldDescriptor, i: int) -> Any:
    """A non-default value of the field's type; `i` makes repeated elements and map keys differ."""
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{i}-é"
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes([0, 255, i])
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None, field.full_name
        nonzero = [v.number for v in field.enum_type.values if v.number != 0]
        assert nonzero, f"enum {field.enum_type.full_name} has no non-zero value"
        return nonzero[i % len(nonzero)]
    if t in _INT32:
        return -123_456 - i  # negative int32: 10-byte varint on the wire
    if t in _UINT32:
        return 4_000_000_000 + i  # above int32 range
    if t in _INT64:
        return -(2**40) - i
    if t in _UINT64:
        return 2**63 + i
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 1.5 + i
    raise AssertionError(f"unhandled type {t} of {field.full_name}")


def populate(msg: Message, depth: int = 0) -> None:
    for field in _fields(msg):
        if _is_map(field):
            container = getattr(msg, field.name)
            key_field = _message_type(field).fields_by_name["key"]
            value_field = _message_type(field).fields_by_name["value"]
            for i in range(2):
                key = _scalar(key_field, i)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    value = container[key]  # creates the entry
                    value.SetInParent()
                    if depth < MAX_DEPTH:
                        populate(value, depth + 1)
                else:
                    container[key] = _scalar(value_field, i)
        elif field.is_repeated:
            container = getattr(msg, field.name)
            for i in range(2):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    element = container.add()
                    if depth < MAX_DEPTH:
                        populate(element, depth + 1)
                else:
                    container.append(_scalar(field, i))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(msg, field.name)
            sub.SetInParent()
            if depth < MAX_DEPTH:
                populate(sub, depth + 1)
        else:
            setattr(msg, field.name, _scalar(field, 0))


def missing_fields(msg: Message, path: str, depth: int = 0) -> list[str]:
    """Paths of fields that are unset/default/short where populate() filled them."""
    out: list[str] = []
    if len(unknown_fields.UnknownFieldSet(msg)) != 0:
        out.append(f"{path}: has unknown fields")
    present = {f.number for f, _ in msg.ListFields()}
    for field in _fields(msg):
        where = f"{path}.{field.name}"
        if field.number not in present:
            out.append(f"{where} (#{field.number}): not present")
            continue
        value = getattr(msg, field.name)
        if field.is_repeated:
            if len(value) != 2:
                out.append(f"{where}: {len(value)} elements instead of 2")
            if depth >= MAX_DEPTH:
                continue
            if _is_map(field):
                value_type = _message_type(field).fields_by_name["value"].type
                if value_type == FieldDescriptor.TYPE_MESSAGE:
                    for key in value:
                        out.extend(missing_fields(value[key], f"{where}[{key!r}]", depth + 1))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                for i, element in enumerate(value):
                    out.extend(missing_fields(element, f"{where}[{i}]", depth + 1))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth < MAX_DEPTH:
                out.extend(missing_fields(value, where, depth + 1))
        elif value == field.default_value:
            out.append(f"{where}: default value {value!r}")
    return out


def test_every_generated_module_has_messages() -> None:
    # Sanity check of the discovery itself (a nested message and a few from each package).
    for name in (
        "connection.Connection",
        "connectioncontext.IpFamily",
        "networkservice.NetworkServiceRequest",
        "registry.NetworkServiceEndpoint",
        "grpc.health.v1.HealthListResponse",
        "nsp.v1.Conduit.PortNat",
        "nsp.v1.Gateway.BfdSpec",
        "nsp.v1.Target",
        "ipam.v1.Child",
    ):
        assert name in MESSAGES
    assert not any(d.GetOptions().map_entry for d in MESSAGES.values())


@pytest.mark.parametrize("full_name", sorted(MESSAGES))
def test_roundtrip(full_name: str) -> None:
    cls = message_factory.GetMessageClass(MESSAGES[full_name])
    original = cls()
    populate(original)
    assert missing_fields(original, full_name) == [], "populate() missed fields"

    data = original.SerializeToString()
    if MESSAGES[full_name].fields:
        assert data
    parsed = cls.FromString(data)

    assert parsed == original
    assert missing_fields(parsed, full_name) == []
    assert parsed.SerializeToString(deterministic=True) == original.SerializeToString(
        deterministic=True
    )
