//! The network calls' requests checked and turned into typed values before anything is
//! changed: a bad MAC, address, prefix, MTU, interface name, scope or state is an
//! INVALID_ARGUMENT naming the field and the value, and the pod's network stays as it was.

use std::fmt;
use std::net::IpAddr;

use nestbox_protocols::protobuf::EnumOrUnknown;
use nestbox_protocols::types::{self, IPFamily};

use crate::error::{invalid, AgentError};

/// The longest interface name the kernel takes (IFNAMSIZ less the terminating NUL).
const IFNAME_MAX: usize = 15;
/// The smallest MTU an IPv4 interface may have (RFC 791), and the largest the kernel's
/// `ip link` takes on any device (ETH_MAX_MTU).
pub const MTU_MIN: u64 = 68;
pub const MTU_MAX: u64 = 65535;

/// rtnetlink route scopes a route may be asked for (RT_SCOPE_*): universe, site, link,
/// host. "nowhere" (255) is the kernel's for routes it made unusable.
pub const SCOPE_UNIVERSE: u8 = 0;
pub const SCOPE_LINK: u8 = 253;
const SCOPES: [u8; 4] = [SCOPE_UNIVERSE, 200, SCOPE_LINK, 254];

/// NUD states a static neighbour entry may have (NUD_PERMANENT, NUD_NOARP); 0 means
/// permanent. The others (reachable, stale, ...) are the kernel's to set as it probes.
pub const NUD_PERMANENT: u16 = 0x80;
const NUD_NOARP: u16 = 0x40;
/// The neighbour flag a request may carry: NTF_ROUTER (the IPv6 neighbour is a router).
const NTF_ROUTER: u8 = 0x80;

/// A link-layer (Ethernet) address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// "aa:bb:cc:dd:ee:ff": six two-digit hex octets separated by colons.
    pub fn parse(field: &str, text: &str) -> Result<Mac, AgentError> {
        let bad = || invalid(format!("{field} {text:?}: not a MAC address (six hex octets: aa:bb:cc:dd:ee:ff)"));
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in octets.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            // from_str_radix alone would take a sign ("+1").
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(octets))
    }

    /// An address an interface can take: not all zeros, not multicast (the kernel refuses
    /// both with EADDRNOTAVAIL).
    pub fn parse_unicast(field: &str, text: &str) -> Result<Mac, AgentError> {
        let mac = Mac::parse(field, text)?;
        if mac.0 == [0; 6] || mac.0[0] & 1 != 0 {
            return Err(invalid(format!("{field} {text:?}: an interface's MAC must be unicast and not all zeros")));
        }
        Ok(mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Formats a link-layer address as the kernel reports it (any length).
pub fn format_lladdr(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// An interface name the kernel takes (`dev_valid_name`): 1 to 15 bytes, not "." or "..",
/// no '/', ':' or white space. Stricter than the kernel: printable ASCII only, so a name
/// always reads back as it was written.
pub fn ifname(field: &str, name: &str) -> Result<String, AgentError> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > IFNAME_MAX {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved")
    } else if !name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':') {
        Some("only printable ASCII without '/' or ':'")
    } else {
        None
    };
    match why {
        Some(why) => Err(invalid(format!("{field} {name:?}: not a valid interface name ({why})"))),
        None => Ok(name.to_string()),
    }
}

/// An address with its prefix length: an interface address, or a route's destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn max_prefix(addr: &IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// Whether the address has bits set past the prefix (a host address, not a network):
    /// shifting the prefix out leaves the host bits.
    fn has_host_bits(&self) -> bool {
        let prefix = u32::from(self.prefix);
        match self.addr {
            IpAddr::V4(a) => u32::from(a).checked_shl(prefix).unwrap_or(0) != 0,
            IpAddr::V6(a) => u128::from(a).checked_shl(prefix).unwrap_or(0) != 0,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// IPv6 link-local (fe80::/10): the kernel's own on every IPv6 interface.
pub fn is_ipv6_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

fn ip(field: &str, text: &str) -> Result<IpAddr, AgentError> {
    text.parse().map_err(|_| invalid(format!("{field} {text:?}: not an IP address")))
}

/// The family a message names: None when unspecified.
fn family(field: &str, family: &EnumOrUnknown<IPFamily>) -> Result<Option<bool>, AgentError> {
    match family.enum_value() {
        Ok(IPFamily::IP_FAMILY_UNSPECIFIED) => Ok(None),
        Ok(IPFamily::IP_FAMILY_V4) => Ok(Some(true)),
        Ok(IPFamily::IP_FAMILY_V6) => Ok(Some(false)),
        Err(n) => Err(invalid(format!("{field} {n}: not an IP family (0 unspecified, 1 IPv4, 2 IPv6)"))),
    }
}

fn family_name(v4: bool) -> &'static str {
    if v4 {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Checks that `addr` is of the family named (if one is).
fn same_family(field: &str, named: Option<bool>, addr: &IpAddr) -> Result<(), AgentError> {
    match named {
        Some(v4) if v4 != addr.is_ipv4() => {
            Err(invalid(format!("{field}: {addr} is not {} as the family says", family_name(v4))))
        }
        _ => Ok(()),
    }
}

/// An interface address: the address of the family named, a prefix within its length, not
/// unspecified or multicast.
fn interface_address(field: &str, a: &types::IPAddress) -> Result<IpNet, AgentError> {
    let addr = ip(&format!("{field}.address"), &a.address)?;
    same_family(&format!("{field}.family"), family(&format!("{field}.family"), &a.family)?, &addr)?;
    if addr.is_unspecified() || addr.is_multicast() {
        return Err(invalid(format!(
            "{field}.address {addr}: an interface address cannot be unspecified or multicast"
        )));
    }
    let max = IpNet::max_prefix(&addr);
    match u8::try_from(a.prefix_len) {
        Ok(prefix) if prefix <= max => Ok(IpNet { addr, prefix }),
        _ => Err(invalid(format!("{field}.prefix_len {}: out of range for {addr} (0 to {max})", a.prefix_len))),
    }
}

/// What UpdateInterface asks for. `mac` and `mtu` are None when the request leaves them
/// as they are (empty, 0: proto3's unset).
#[derive(Debug)]
pub struct InterfaceSpec {
    pub device: Option<String>,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: Option<u32>,
    pub addresses: Vec<IpNet>,
}

pub fn interface(i: &types::Interface) -> Result<InterfaceSpec, AgentError> {
    let name = ifname("interface.name", &i.name)?;
    let device = match i.device.as_str() {
        "" => None,
        d => Some(ifname("interface.device", d)?),
    };
    let mac = match i.hw_addr.as_str() {
        "" => None,
        text => Some(Mac::parse_unicast("interface.hw_addr", text)?),
    };
    let mtu = match i.mtu {
        0 => None,
        m if (MTU_MIN..=MTU_MAX).contains(&m) => Some(m as u32),
        m => return Err(invalid(format!("interface.mtu {m}: out of range ({MTU_MIN} to {MTU_MAX})"))),
    };
    let mut addresses: Vec<IpNet> = Vec::with_capacity(i.addresses.len());
    for (n, a) in i.addresses.iter().enumerate() {
        let net = interface_address(&format!("interface.addresses[{n}]"), a)?;
        if let Some(k) = addresses.iter().position(|b| b.addr == net.addr) {
            return Err(invalid(format!("interface.addresses[{n}] {net}: {} listed twice (addresses[{k}])", net.addr)));
        }
        addresses.push(net);
    }
    Ok(InterfaceSpec { device, name, mac, mtu, addresses })
}

/// One route UpdateRoutes asks for, in the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub v4: bool,
    /// The destination; for the default route, the unspecified address with prefix 0.
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    pub scope: u8,
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dest.prefix {
            0 => write!(f, "default")?,
            _ => write!(f, "{}", self.dest)?,
        }
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        write!(f, " dev {}", self.device)
    }
}

/// A route's destination: "" for the default, else a network in CIDR form (no host bits).
fn destination(field: &str, text: &str, v4: Option<bool>) -> Result<Option<IpNet>, AgentError> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| invalid(format!("{field} {text:?}: {why}"));
    let (addr, prefix) = text.split_once('/').ok_or_else(|| bad("not in CIDR form (address/prefix)"))?;
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address before the '/'"))?;
    let max = IpNet::max_prefix(&addr);
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| bad(&format!("prefix out of range (0 to {max})")))?;
    let net = IpNet { addr, prefix };
    if net.has_host_bits() {
        return Err(bad("has bits set past the prefix (a route's destination is a network)"));
    }
    same_family(field, v4, &addr)?;
    Ok(Some(net))
}

fn route(n: usize, r: &types::Route) -> Result<RouteSpec, AgentError> {
    let field = |f: &str| format!("routes[{n}].{f}");
    let named = family(&field("family"), &r.family)?;
    let dest = destination(&field("dest"), &r.dest, named)?;
    let optional_ip = |f: &str, text: &str| match text {
        "" => Ok(None),
        t => ip(&field(f), t).map(Some),
    };
    let gateway = optional_ip("gateway", &r.gateway)?;
    let source = optional_ip("source", &r.source)?;
    let v4 = named
        .or(dest.map(|d| d.addr.is_ipv4()))
        .or(gateway.map(|g| g.is_ipv4()))
        .or(source.map(|s| s.is_ipv4()))
        .ok_or_else(|| invalid(format!("routes[{n}]: a default route without a gateway or source needs its family")))?;
    let v4 = Some(v4);
    if let Some(g) = &gateway {
        same_family(&format!("{} {g}", field("gateway")), v4, g)?;
    }
    if let Some(s) = &source {
        same_family(&format!("{} {s}", field("source")), v4, s)?;
    }
    let v4 = v4 == Some(true);
    let device = ifname(&field("device"), &r.device)?;
    let scope = u8::try_from(r.scope).ok().filter(|s| SCOPES.contains(s)).ok_or_else(|| {
        invalid(format!("{} {}: not a route scope (0 universe, 200 site, 253 link, 254 host)", field("scope"), r.scope))
    })?;
    if !v4 && scope != SCOPE_UNIVERSE {
        return Err(invalid(format!("{} {scope}: IPv6 routes have no scope (0)", field("scope"))));
    }
    if gateway.is_some() && scope >= SCOPE_LINK {
        return Err(invalid(format!("{} {scope}: a route via a gateway cannot be link or host scope", field("scope"))));
    }
    let any = if v4 { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u8; 16]) };
    let dest = dest.unwrap_or(IpNet { addr: any, prefix: 0 });
    Ok(RouteSpec { v4, dest, gateway, device, source, scope })
}

/// The routes of an UpdateRoutes, each checked; a destination may be listed once only
/// (the second would replace the first).
pub fn routes(routes: &[types::Route]) -> Result<Vec<RouteSpec>, AgentError> {
    let mut specs: Vec<RouteSpec> = Vec::with_capacity(routes.len());
    for (n, r) in routes.iter().enumerate() {
        let spec = route(n, r)?;
        if let Some(k) = specs.iter().position(|s| s.dest == spec.dest) {
            return Err(invalid(format!("routes[{n}] ({spec}): its destination is already routes[{k}]'s")));
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// One neighbour entry AddArpNeighbors asks for.
#[derive(Debug)]
pub struct NeighbourSpec {
    pub ip: IpAddr,
    pub device: String,
    pub mac: Mac,
    pub state: u16,
    pub flags: u8,
}

pub fn neighbour(n: usize, a: &types::ARPNeighbor) -> Result<NeighbourSpec, AgentError> {
    let field = |f: &str| format!("neighbors[{n}].{f}");
    let to = a.to_ip.as_ref().ok_or_else(|| invalid(format!("{}: missing", field("to_ip"))))?;
    let ip = ip(&field("to_ip.address"), &to.address)?;
    same_family(&field("to_ip.family"), family(&field("to_ip.family"), &to.family)?, &ip)?;
    if to.prefix_len != 0 && to.prefix_len != u32::from(IpNet::max_prefix(&ip)) {
        return Err(invalid(format!(
            "{} {}: a neighbour is one address (0 or the full length)",
            field("to_ip.prefix_len"),
            to.prefix_len
        )));
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(format!(
            "{} {ip}: a neighbour cannot be unspecified or multicast",
            field("to_ip.address")
        )));
    }
    let device = ifname(&field("device"), &a.device)?;
    let mac = Mac::parse(&field("lladdr"), &a.lladdr)?;
    let state = match a.state {
        0 => NUD_PERMANENT,
        s if s == i32::from(NUD_PERMANENT) || s == i32::from(NUD_NOARP) => s as u16,
        s => {
            return Err(invalid(format!(
                "{} {s:#x}: only static entries are set (0x80 permanent, 0x40 noarp; 0: permanent)",
                field("state")
            )))
        }
    };
    let flags = match a.flags {
        0 => 0,
        f if f == i32::from(NTF_ROUTER) && ip.is_ipv6() => NTF_ROUTER,
        f => return Err(invalid(format!("{} {f:#x}: only 0x80 (router, IPv6) may be set", field("flags")))),
    };
    Ok(NeighbourSpec { ip, device, mac, state, flags })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(e: AgentError) -> String {
        assert!(matches!(e, AgentError::InvalidArgument(_)), "{e:?}");
        e.to_string()
    }

    #[test]
    fn macs() {
        assert_eq!(Mac::parse("f", "02:00:c6:33:64:0A").expect("valid").to_string(), "02:00:c6:33:64:0a");
        for bad in [
            "",
            "02:00:c6:33:64",
            "02:00:c6:33:64:02:03",
            "2:00:c6:33:64:02",
            "02-00-c6-33-64-02",
            "0g:00:00:00:00:00",
            "+1:00:00:00:00:00",
        ] {
            assert!(msg(Mac::parse("f", bad).expect_err(bad)).starts_with(&format!("f {bad:?}")));
        }
        assert!(msg(Mac::parse_unicast("f", "00:00:00:00:00:00").expect_err("zero")).contains("unicast"));
        assert!(msg(Mac::parse_unicast("f", "33:33:00:00:00:01").expect_err("multicast")).contains("unicast"));
    }

    #[test]
    fn interface_names() {
        for good in ["eth0", "a", "fifteen-bytes-x", "veth.1@x"] {
            assert_eq!(ifname("f", good).expect(good), good);
        }
        for bad in ["", "sixteen-bytes-xx", ".", "..", "a/b", "a:b", "a b", "e\u{e9}"] {
            assert!(msg(ifname("f", bad).expect_err(bad)).contains("not a valid interface name"), "{bad}");
        }
    }

    fn ipaddr(family: IPFamily, address: &str, prefix_len: u32) -> types::IPAddress {
        types::IPAddress { family: family.into(), address: address.into(), prefix_len, ..Default::default() }
    }

    #[test]
    fn interfaces() {
        let mut i = types::Interface { name: "eth0".into(), ..Default::default() };
        let spec = interface(&i).expect("only a name");
        assert_eq!((spec.device, spec.mac, spec.mtu, spec.addresses.len()), (None, None, None, 0));
        i.mtu = 65535;
        i.addresses =
            vec![ipaddr(IPFamily::IP_FAMILY_V4, "10.1.2.3", 32), ipaddr(IPFamily::IP_FAMILY_UNSPECIFIED, "fd00::1", 0)];
        assert_eq!(interface(&i).expect("valid").addresses[1].to_string(), "fd00::1/0");
        let bad = |change: &dyn Fn(&mut types::Interface), text: &str| {
            let mut j = i.clone();
            change(&mut j);
            let e = msg(interface(&j).expect_err(text));
            assert!(e.contains(text), "{e:?} lacks {text:?}");
        };
        bad(&|j| j.mtu = 67, "interface.mtu 67: out of range");
        bad(&|j| j.mtu = 65536, "interface.mtu 65536");
        bad(&|j| j.name.clear(), "interface.name \"\"");
        bad(&|j| j.device = "x/y".into(), "interface.device \"x/y\"");
        bad(&|j| j.addresses[0].prefix_len = 33, "interface.addresses[0].prefix_len 33");
        bad(&|j| j.addresses[1].prefix_len = 129, "interface.addresses[1].prefix_len 129");
        bad(
            &|j| j.addresses[1].family = IPFamily::IP_FAMILY_V4.into(),
            "interface.addresses[1].family: fd00::1 is not IPv4",
        );
        bad(&|j| j.addresses[0].family = EnumOrUnknown::from_i32(7), "interface.addresses[0].family 7");
        bad(&|j| j.addresses[0].address = "10.1.2".into(), "interface.addresses[0].address \"10.1.2\"");
        bad(&|j| j.addresses[0].address = "224.0.0.1".into(), "multicast");
        bad(&|j| j.addresses[0].address = "0.0.0.0".into(), "unspecified");
        bad(
            &|j| j.addresses.push(ipaddr(IPFamily::IP_FAMILY_V4, "10.1.2.3", 8)),
            "addresses[2] 10.1.2.3/8: 10.1.2.3 listed twice",
        );
    }

    fn r(dest: &str, gateway: &str, scope: u32) -> types::Route {
        types::Route { dest: dest.into(), gateway: gateway.into(), device: "eth0".into(), scope, ..Default::default() }
    }

    #[test]
    fn route_checks() {
        let ok = routes(&[r("", "10.0.0.1", 0), r("10.0.0.0/8", "", 253), r("fd00::/64", "", 0), r("", "fd00::1", 0)])
            .expect("valid");
        assert_eq!(ok[0].to_string(), "default via 10.0.0.1 dev eth0");
        assert_eq!((ok[0].v4, ok[2].v4, ok[3].dest.to_string()), (true, false, "::/0".into()));
        let bad = |routes_: &[types::Route], text: &str| {
            let e = msg(routes(routes_).expect_err(text));
            assert!(e.contains(text), "{e:?} lacks {text:?}");
        };
        bad(&[r("10.0.0.1/8", "", 0)], "routes[0].dest \"10.0.0.1/8\": has bits set past the prefix");
        bad(&[r("10.0.0.0/33", "", 0)], "prefix out of range (0 to 32)");
        bad(&[r("10.0.0.0", "", 0)], "CIDR");
        bad(&[r("fd00::/129", "", 0)], "0 to 128");
        bad(&[r("", "10.0.0.256", 0)], "routes[0].gateway \"10.0.0.256\"");
        bad(&[r("10.0.0.0/8", "fd00::1", 0)], "is not IPv4");
        bad(&[types::Route { source: "fd00::2".into(), ..r("10.0.0.0/8", "", 0) }], "routes[0].source fd00::2");
        bad(&[r("", "10.0.0.1", 253)], "routes[0].scope 253: a route via a gateway");
        bad(&[r("10.0.0.0/8", "", 1)], "routes[0].scope 1: not a route scope");
        bad(&[r("fd00::/64", "", 253)], "IPv6 routes have no scope");
        bad(&[r("", "", 0)], "needs its family");
        bad(&[types::Route { device: String::new(), ..r("", "10.0.0.1", 0) }], "routes[0].device");
        bad(
            &[r("", "10.0.0.1", 0), r("", "10.0.0.2", 0)],
            "routes[1] (default via 10.0.0.2 dev eth0): its destination is already routes[0]'s",
        );
        let v6 = types::Route { family: IPFamily::IP_FAMILY_V6.into(), ..r("10.0.0.0/8", "", 0) };
        bad(&[v6], "routes[0].dest: 10.0.0.0 is not IPv6");
        // A default route through the link, no gateway: its family says which.
        let dev_default = types::Route { family: IPFamily::IP_FAMILY_V4.into(), ..r("", "", 0) };
        assert!(routes(&[dev_default]).expect("valid")[0].v4);
    }

    #[test]
    fn neighbour_checks() {
        let n = types::ARPNeighbor {
            to_ip: Some(ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.9", 32)).into(),
            device: "eth0".into(),
            lladdr: "02:00:00:00:00:09".into(),
            ..Default::default()
        };
        assert_eq!(neighbour(0, &n).expect("valid").state, NUD_PERMANENT, "0: permanent");
        let bad = |change: &dyn Fn(&mut types::ARPNeighbor), text: &str| {
            let mut m = n.clone();
            change(&mut m);
            let e = msg(neighbour(3, &m).expect_err(text));
            assert!(e.contains(text), "{e:?} lacks {text:?}");
        };
        bad(&|m| m.to_ip = None.into(), "neighbors[3].to_ip: missing");
        bad(&|m| m.to_ip.as_mut().expect("set").prefix_len = 24, "neighbors[3].to_ip.prefix_len 24");
        bad(&|m| m.lladdr = "02:00".into(), "neighbors[3].lladdr \"02:00\"");
        bad(&|m| m.state = 2, "neighbors[3].state 0x2");
        bad(&|m| m.flags = 0x80, "neighbors[3].flags 0x80");
        bad(&|m| m.device = "".into(), "neighbors[3].device");
    }
}
