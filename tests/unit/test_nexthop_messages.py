"""The nexthop/route message classes of proxy.kernel.nexthop, byte by byte (no kernel needed).

Encoded requests are checked twice: with a tiny independent TLV reader written here from the
UAPI layout (so a bug shared by encoder and decoder cannot hide), and by decoding them again
with the module's own classes.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from proxy.kernel import errors
from proxy.kernel import nexthop as nh

NLMSGHDR = struct.Struct("=IHHII")
NHMSG = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")
NLA = struct.Struct("=HH")
NLA_F_NESTED = 0x8000


def tlvs(data: bytes, offset: int = 0, end: int | None = None) -> list[tuple[int, bytes]]:
    """(type with flags, payload) of each attribute in data[offset:end]."""
    end = len(data) if end is None else end
    out = []
    while offset + 4 <= end:
        length, kind = NLA.unpack_from(data, offset)
        out.append((kind, bytes(data[offset + 4 : offset + length])))
        offset += (length + 3) & ~3
    return out


def encode(msg: nh.nhmsg | nh.rtmsg_nh, msg_type: int) -> bytes:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = 0x5
    msg.encode()
    return bytes(msg.data)


def nh_attrs(data: bytes) -> dict[int, bytes]:
    found = tlvs(data, NLMSGHDR.size + NHMSG.size)
    kinds = [kind for kind, _ in found]
    assert len(kinds) == len(set(kinds)), kinds
    return dict(found)


def decode_nh(data: bytes) -> nh.nhmsg:
    msg = nh.nhmsg(data)
    msg.decode()
    return msg


# --- single nexthops ---------------------------------------------------------------------------


def test_ipv4_nexthop_request_layout() -> None:
    msg = nh.nexthop_request(7, family=socket.AF_INET, gateway="198.18.0.2", oif=3)
    data = encode(msg, nh.RTM_NEWNEXTHOP)

    length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data)
    assert length == len(data)
    assert kind == 104
    assert NHMSG.unpack_from(data, NLMSGHDR.size) == (socket.AF_INET, 0, nh.RTPROT_BOOT, 0, 0)
    assert nh_attrs(data) == {
        1: struct.pack("=I", 7),  # NHA_ID
        5: struct.pack("=I", 3),  # NHA_OIF
        6: socket.inet_pton(socket.AF_INET, "198.18.0.2"),  # NHA_GATEWAY, network order
    }

    back = nh.nexthop_from_msg(decode_nh(data))
    assert back == nh.Nexthop(
        id=7, family=socket.AF_INET, protocol=nh.RTPROT_BOOT, gateway="198.18.0.2", oif=3
    )


def test_ipv6_nexthop_gateway_is_16_bytes_and_onlink_is_a_flag() -> None:
    msg = nh.nexthop_request(
        8, family=socket.AF_INET6, gateway="2001:db8::2", oif=4, onlink=True, protocol=99
    )
    data = encode(msg, nh.RTM_NEWNEXTHOP)

    assert NHMSG.unpack_from(data, NLMSGHDR.size) == (socket.AF_INET6, 0, 99, 0, nh.RTNH_F_ONLINK)
    assert nh_attrs(data)[6] == socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    back = nh.nexthop_from_msg(decode_nh(data))
    assert (back.gateway, back.family, back.flags) == (
        "2001:db8::2",
        socket.AF_INET6,
        nh.RTNH_F_ONLINK,
    )


def test_blackhole_is_an_empty_flag_attribute() -> None:
    data = encode(nh.nexthop_request(9, family=socket.AF_INET, blackhole=True), 104)
    assert nh_attrs(data) == {1: struct.pack("=I", 9), 4: b""}
    assert nh.nexthop_from_msg(decode_nh(data)).blackhole


def test_id_request_carries_only_the_id_and_a_zero_header() -> None:
    data = encode(nh.id_request(0xFFFF_FFF0), nh.RTM_DELNEXTHOP)
    assert NHMSG.unpack_from(data, NLMSGHDR.size) == (0, 0, 0, 0, 0)
    assert nh_attrs(data) == {1: struct.pack("=I", 0xFFFF_FFF0)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": socket.AF_INET, "gateway": "2001:db8::1"}, "not of family"),
        ({"family": socket.AF_INET, "blackhole": True, "oif": 1}, "blackhole"),
        ({"family": socket.AF_UNSPEC}, "AF_INET"),
    ],
)
def test_nexthop_request_rejects_nonsense(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nh.nexthop_request(1, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 2**32])
def test_ids_are_u32_and_not_zero(bad: int) -> None:
    with pytest.raises(ValueError, match="id"):
        nh.id_request(bad)


# --- groups --------------------------------------------------------------------------------


def test_group_array_packs_weight_minus_one_in_two_bytes() -> None:
    packed = nh.pack_group([(1, 1), (2, 3), (3, 256), (4, 257), (5, 65535)])
    assert packed == (
        struct.pack("=IBBH", 1, 0, 0, 0)
        + struct.pack("=IBBH", 2, 2, 0, 0)
        + struct.pack("=IBBH", 3, 255, 0, 0)
        + struct.pack("=IBBH", 4, 0, 1, 0)
        + struct.pack("=IBBH", 5, 254, 255, 0)
    )
    assert nh.unpack_group(packed) == ((1, 1), (2, 3), (3, 256), (4, 257), (5, 65535))


@given(
    st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(1, 65535)), min_size=1, max_size=64)
)
def test_group_array_round_trips(members: list[tuple[int, int]]) -> None:
    packed = nh.pack_group(members)
    assert len(packed) == 8 * len(members)
    assert nh.unpack_group(packed) == tuple(members)
    # Without the kernel's NHA_OP_FLAG_RESP_GRP_RESVD_0, weight_high is a reserved byte.
    legacy = nh.unpack_group(packed, weight_high_valid=False)
    assert legacy == tuple((i, ((w - 1) & 0xFF) + 1) for i, w in members)


def test_multipath_group_request_layout() -> None:
    msg = nh.group_request(100, [(1, 1), (2, 3)], resilient=None)
    data = encode(msg, nh.RTM_NEWNEXTHOP)
    assert NHMSG.unpack_from(data, NLMSGHDR.size) == (socket.AF_UNSPEC, 0, nh.RTPROT_BOOT, 0, 0)
    assert nh_attrs(data) == {
        1: struct.pack("=I", 100),
        2: nh.pack_group([(1, 1), (2, 3)]),
        3: struct.pack("=H", nh.NEXTHOP_GRP_TYPE_MPATH),  # u16: nla_len 6, then padding
    }


def test_resilient_group_is_nested_and_timers_are_clock_t() -> None:
    params = nh.ResilientParams(buckets=128, idle_timer=1, unbalanced_timer=30)
    data = encode(nh.group_request(200, [(1, 1), (2, 1)], resilient=params), 104)
    attrs = nh_attrs(data)

    assert attrs[3] == struct.pack("=H", nh.NEXTHOP_GRP_TYPE_RES)
    assert 12 not in attrs, "NHA_RES_GROUP without NLA_F_NESTED: the kernel answers EINVAL"
    nested = attrs[12 | NLA_F_NESTED]
    assert dict(tlvs(nested)) == {
        1: struct.pack("=H", 128),  # NHA_RES_GROUP_BUCKETS u16
        2: struct.pack("=I", 100),  # NHA_RES_GROUP_IDLE_TIMER: 1 s = 100 clock_t
        3: struct.pack("=I", 3000),  # NHA_RES_GROUP_UNBALANCED_TIMER: 30 s
    }

    back = nh.nexthop_from_msg(decode_nh(data))
    assert back.group_type is nh.GroupType.RESILIENT
    assert back.resilient == params
    assert back.group == ((1, 1), (2, 1))


def test_dumped_group_trusts_weight_high_only_when_the_kernel_says_so() -> None:
    msg = nh.group_request(5, [(1, 300)], resilient=None)
    data = encode(msg, nh.RTM_NEWNEXTHOP)
    assert nh.nexthop_from_msg(decode_nh(data)).group == ((1, 300 - 256),)

    msg = nh.group_request(5, [(1, 300)], resilient=None)
    msg["attrs"].append(("NHA_OP_FLAGS", nh.NHA_OP_FLAG_RESP_GRP_RESVD_0))
    data = encode(msg, nh.RTM_NEWNEXTHOP)
    assert nh.nexthop_from_msg(decode_nh(data)).group == ((1, 300),)


@pytest.mark.parametrize(
    "members",
    [[], [(1, 0)], [(1, 65536)], [(0, 1)]],
)
def test_group_request_rejects_bad_members(members: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        nh.group_request(1, members, resilient=None)


def test_resilient_params_validate_and_sit_on_the_clock_t_grid() -> None:
    assert nh.ResilientParams(32, 0.123, 1).idle_timer == 0.12
    assert nh.ResilientParams(32, 1, 30) == nh.ResilientParams(32, 1.0, 30.0)
    with pytest.raises(ValueError, match="buckets"):
        nh.ResilientParams(0, 1, 1)
    with pytest.raises(ValueError, match="buckets"):
        nh.ResilientParams(65536, 1, 1)
    with pytest.raises(ValueError, match="timer"):
        nh.ResilientParams(8, -1, 1)
    with pytest.raises(ValueError, match="timer"):
        nh.ResilientParams(8, 1, 2**32 / 100)


def test_bucket_message_decodes() -> None:
    msg = nh.nhmsg()
    msg["family"] = 0
    msg["attrs"] = [
        ("NHA_ID", 200),
        (
            "NHA_RES_BUCKET",
            {
                "attrs": [
                    ("NHA_RES_BUCKET_INDEX", 17),
                    ("NHA_RES_BUCKET_IDLE_TIME", 250),
                    ("NHA_RES_BUCKET_NH_ID", 3),
                ]
            },
        ),
    ]
    data = encode(msg, nh.RTM_NEWNEXTHOPBUCKET)
    assert 13 | NLA_F_NESTED in nh_attrs(data)
    assert nh.bucket_from_msg(decode_nh(data)) == (200, nh.Bucket(index=17, nhid=3))


# --- routes --------------------------------------------------------------------------------


def rt_attrs(data: bytes) -> dict[int, bytes]:
    return dict(tlvs(data, NLMSGHDR.size + RTMSG.size))


def test_route_by_nhid_layout_with_a_table_above_255() -> None:
    msg = nh.route_nhid_request(
        family=socket.AF_INET, table=4096, dst="default", nhid=200, priority=10
    )
    data = encode(msg, nh.RTM_NEWROUTE)
    family, dst_len, _src, _tos, table, proto, scope, kind, _flags = RTMSG.unpack_from(
        data, NLMSGHDR.size
    )
    assert (family, dst_len, table, proto, scope, kind) == (
        socket.AF_INET,
        0,
        nh.RT_TABLE_COMPAT,
        nh.RTPROT_BOOT,
        nh.RT_SCOPE_UNIVERSE,
        nh.RouteType.UNICAST,
    )
    assert rt_attrs(data) == {
        15: struct.pack("=I", 4096),  # RTA_TABLE
        6: struct.pack("=I", 10),  # RTA_PRIORITY
        30: struct.pack("=I", 200),  # RTA_NH_ID
    }


def test_route_request_with_a_prefix_and_a_guard_type() -> None:
    msg = nh.route_type_request(
        family=socket.AF_INET6,
        table=7,
        dst="2001:db8:1::/48",
        type=nh.RouteType.UNREACHABLE,
        priority=2**32 - 1,
    )
    data = encode(msg, nh.RTM_NEWROUTE)
    fields = RTMSG.unpack_from(data, NLMSGHDR.size)
    assert (fields[0], fields[1], fields[4], fields[7]) == (socket.AF_INET6, 48, 7, 7)
    attrs = rt_attrs(data)
    assert attrs[1] == socket.inet_pton(socket.AF_INET6, "2001:db8:1::")  # RTA_DST
    assert attrs[6] == struct.pack("=I", 2**32 - 1)
    assert 30 not in attrs
    with pytest.raises(ValueError, match="nexthop"):
        nh.route_type_request(
            family=socket.AF_INET, table=7, dst="default", type=nh.RouteType.UNICAST
        )
    with pytest.raises(ValueError, match="family"):
        nh.route_nhid_request(family=socket.AF_INET, table=7, dst="2001:db8::/32", nhid=1)


def test_rtmsg_nh_decodes_nhid_even_after_rtmsg_compiled_its_table() -> None:
    # Use pyroute2's rtmsg first: this compiles (and caches) its NLA table on the class.
    plain = rtmsg()
    plain["family"] = socket.AF_INET
    plain["attrs"] = [("RTA_TABLE", 5)]
    plain["header"]["type"] = nh.RTM_NEWROUTE
    plain.encode()

    request = nh.route_nhid_request(family=socket.AF_INET, table=4096, dst="default", nhid=42)
    data = encode(request, nh.RTM_NEWROUTE)
    assert 30 in rt_attrs(data)

    msg = nh.rtmsg_nh(data)
    msg.decode()
    route = nh.route_from_msg(msg)
    assert route.nhid == 42
    assert route.table == 4096
    assert str(route.dst) == "0.0.0.0/0" and route.dst_len == 0

    # pyroute2's own class leaves it undecoded, which is why rtmsg_nh exists.
    theirs = rtmsg(data)
    theirs.decode()
    assert theirs.get_attr("RTA_NH_ID") is None


def test_the_inherited_compiled_table_pitfall_is_real() -> None:
    """Why rtmsg_nh resets `_nlmsg_base__compiled_nla`: without it, a subclass reuses the table
    pyroute2 cached on `rtmsg` and silently drops RTA_NH_ID."""
    rtmsg()  # compiles rtmsg's table (if nothing did before)

    class naive(rtmsg):  # type: ignore[misc]
        nla_map = nh.rtmsg_nh.nla_map

    data = encode(
        nh.route_nhid_request(family=socket.AF_INET, table=9, dst="default", nhid=42),
        nh.RTM_NEWROUTE,
    )
    msg = naive(data)
    msg.decode()
    assert msg.get_attr("RTA_NH_ID") is None


def test_route_with_nhid_drops_the_kernels_compat_expansion() -> None:
    msg = nh.route_nhid_request(family=socket.AF_INET, table=4096, dst="default", nhid=42)
    msg["attrs"] += [("RTA_GATEWAY", "198.18.0.2"), ("RTA_OIF", 3)]
    decoded = nh.rtmsg_nh(encode(msg, nh.RTM_NEWROUTE))
    decoded.decode()
    route = nh.route_from_msg(decoded)
    assert (route.nhid, route.gateway, route.oif, route.multipath) == (42, None, None, ())


def test_legacy_route_keeps_gateway_and_oif() -> None:
    msg = nh.route_type_request(
        family=socket.AF_INET, table=4096, dst="default", type=nh.RouteType.BLACKHOLE
    )
    msg["type"] = nh.RouteType.UNICAST
    msg["attrs"] += [("RTA_GATEWAY", "198.18.0.2"), ("RTA_OIF", 3)]
    decoded = nh.rtmsg_nh(encode(msg, nh.RTM_NEWROUTE))
    decoded.decode()
    route = nh.route_from_msg(decoded)
    assert (route.nhid, route.gateway, route.oif, route.priority) == (None, "198.18.0.2", 3, 0)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.EEXIST, errors.Exists),
        (errno.ENOENT, errors.NotFound),
        (errno.ESRCH, errors.NotFound),
        (errno.EADDRNOTAVAIL, errors.NotFound),
        (errno.ENODEV, errors.NoSuchDevice),
        (errno.EOPNOTSUPP, errors.Unsupported),
        (errno.EAFNOSUPPORT, errors.Unsupported),
        (errno.EPROTONOSUPPORT, errors.Unsupported),
        (errno.EINVAL, errors.InvalidArgument),
        (errno.EPERM, errors.PermissionDenied),
        (errno.EACCES, errors.PermissionDenied),
        (errno.EBUSY, errors.Busy),
        (errno.ENETDOWN, errors.KernelError),
    ],
)
def test_errno_mapping(code: int, cls: type[errors.KernelError]) -> None:
    error = errors.from_netlink_error(NetlinkError(code))
    assert type(error) is cls
    assert error.errno == code
    assert error.extack is None
    assert issubclass(errors.NoSuchDevice, errors.NotFound)


def test_extack_is_kept_and_shown() -> None:
    error = errors.from_netlink_error(
        NetlinkError(errno.EINVAL, "Invalid nexthop id"), "add group 5"
    )
    assert isinstance(error, errors.InvalidArgument)
    assert error.extack == "Invalid nexthop id"
    assert error.message == "Invalid argument"
    assert str(error) == "add group 5: Invalid nexthop id: Invalid argument (EINVAL)"
