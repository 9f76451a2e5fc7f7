//! Property tests of the parsers that read outside input (network config JSON, lease values
//! and keys from etcd, command-line flags): arbitrary input gives a value or an error, never a
//! panic, and what is accepted satisfies the invariants the rest of the agent relies on.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use flannel_agent::cli::Flags;
use flannel_agent::config::NetworkConfig;
use flannel_agent::lease::{LeaseAttrs, SubnetKey};
use ipnetwork::{Ipv4Network, Ipv6Network};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

const CASES: u32 = 2000;

/// Modest, reproducible runs that leave no regression files behind.
fn config() -> Config {
    Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinities", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn v4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        // Mostly inside 10.0.0.0/8 so that they often fall into the generated Network.
        (0u8..4, any::<u8>(), any::<u8>()).prop_map(|(b, c, d)| Ipv4Addr::new(
            10,
            244 + b.min(11),
            c,
            d & 0xf0
        )),
        any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

/// Values for one config field: often plausible, sometimes of another type or garbage.
fn field_value(name: &'static str) -> BoxedStrategy<Value> {
    let plausible: BoxedStrategy<Value> = match name {
        "Network" => (v4(), 0u8..=32)
            .prop_map(|(ip, p)| Value::from(format!("{ip}/{p}")))
            .boxed(),
        "SubnetLen" => (0u64..=34).prop_map(Value::from).boxed(),
        "SubnetMin" | "SubnetMax" => v4().prop_map(|ip| Value::from(ip.to_string())).boxed(),
        "EnableIPv4" | "EnableIPv6" => any::<bool>().prop_map(Value::Bool).boxed(),
        "IPv6Network" => (any::<u128>(), 0u8..=128)
            .prop_map(|(ip, p)| Value::from(format!("{}/{p}", Ipv6Addr::from(ip))))
            .boxed(),
        "Backend" => prop_oneof![
            Just(json!({"Type": "udp"})),
            Just(json!({"Type": "udp", "Port": 8285})),
            Just(json!({"Type": "vxlan", "VNI": 1})),
            any_json(),
        ]
        .boxed(),
        _ => any_json().boxed(),
    };
    prop_oneof![4 => plausible, 1 => any_json()].boxed()
}

const FIELDS: [&str; 8] = [
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "IPv6Network",
    "Backend",
];

/// A config object: each known field present or not (sometimes with odd capitalisation, which
/// Go's decoder accepts), plus the odd unknown key.
fn config_object() -> impl Strategy<Value = Value> {
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = FIELDS
        .iter()
        .map(|&name| {
            let key = prop_oneof![4 => Just(name.to_owned()), 1 => Just(name.to_lowercase())];
            let present = if name == "Network" { 0.9 } else { 0.5 };
            prop::option::weighted(present, (key, field_value(name))).boxed()
        })
        .collect();
    (
        fields,
        prop::collection::btree_map("[A-Za-z]{1,10}", any_json(), 0..2),
    )
        .prop_map(|(known, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (k, v) in known.into_iter().flatten() {
                m.insert(k, v);
            }
            Value::Object(m)
        })
}

fn check_config_invariants(cfg: &NetworkConfig) {
    if !cfg.enable_ipv4 {
        return;
    }
    let net = cfg.network;
    let (min, max) = (u32::from(cfg.subnet_min), u32::from(cfg.subnet_max));
    assert!(
        min <= max,
        "SubnetMin {} > SubnetMax {}",
        cfg.subnet_min,
        cfg.subnet_max
    );
    assert!(net.contains(cfg.subnet_min), "SubnetMin outside {net}");
    assert!(net.contains(cfg.subnet_max), "SubnetMax outside {net}");
    assert!(
        (net.prefix() + 2..=30).contains(&cfg.subnet_len),
        "SubnetLen /{} for Network {net}",
        cfg.subnet_len
    );
    let host_bits = u32::MAX >> cfg.subnet_len;
    assert_eq!(min & host_bits, 0, "SubnetMin {} unaligned", cfg.subnet_min);
    assert_eq!(max & host_bits, 0, "SubnetMax {} unaligned", cfg.subnet_max);
}

#[test]
fn network_config_accepts_only_consistent_configs() {
    let accepted = AtomicU32::new(0);
    let mut runner = TestRunner::new(config());
    runner
        .run(&config_object(), |obj| {
            let bytes = serde_json::to_vec(&obj).expect("serialising a Value");
            if let Ok(cfg) = NetworkConfig::parse(&bytes) {
                accepted.fetch_add(1, Ordering::Relaxed);
                check_config_invariants(&cfg);
            }
            Ok(())
        })
        .expect("property holds");
    // The generator must reach the accepting paths, or the invariants were never checked.
    let accepted = accepted.into_inner();
    assert!(
        // About 5 % parse with this generator; 1 % leaves room for chance.
        accepted >= CASES / 100,
        "only {accepted} of {CASES} configs parsed"
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn network_config_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = NetworkConfig::parse(&bytes);
    }

    #[test]
    fn network_config_never_panics_on_any_json(v in any_json()) {
        let bytes = serde_json::to_vec(&v).expect("serialising a Value");
        if let Ok(cfg) = NetworkConfig::parse(&bytes) {
            check_config_invariants(&cfg);
        }
    }

    #[test]
    fn lease_attrs_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = LeaseAttrs::from_json("k", &bytes);
    }

    #[test]
    fn lease_attrs_from_any_json_reserialise_stably(
        v in any_json(),
        ip in any::<u32>(),
        fields in prop::collection::btree_map(
            prop_oneof![
                Just("PublicIPv6".to_owned()),
                Just("BackendType".to_owned()),
                Just("BackendData".to_owned()),
                Just("BackendV6Data".to_owned()),
            ],
            any_json(),
            0..4,
        ),
    ) {
        let _ = LeaseAttrs::from_json("k", v.to_string().as_bytes());
        let mut obj: Map<String, Value> = fields.into_iter().collect();
        obj.insert("PublicIP".into(), Value::from(Ipv4Addr::from(ip).to_string()));
        if let Ok(attrs) = LeaseAttrs::from_json("k", Value::Object(obj).to_string().as_bytes()) {
            let once = attrs.to_json();
            let again = LeaseAttrs::from_json("k", once.as_bytes()).expect("our own output parses");
            prop_assert_eq!(&again, &attrs);
            prop_assert_eq!(again.to_json(), once);
        }
    }

    #[test]
    fn valid_lease_attrs_round_trip_byte_identically(
        ip in any::<u32>(),
        ip6 in prop::option::of(any::<u128>()),
        backend_type in prop_oneof![Just(String::new()), "[a-z-]{1,10}", ".{0,10}"],
        // A null BackendData reads as absent (and is then left out, where Go writes `null`).
        data in prop::option::of(any_json().prop_filter("null", |v| !v.is_null())),
        data6 in prop::option::of(any_json().prop_filter("null", |v| !v.is_null())),
    ) {
        let mut obj = Map::new();
        obj.insert("PublicIP".into(), Value::from(Ipv4Addr::from(ip).to_string()));
        if let Some(v6) = ip6 {
            obj.insert("PublicIPv6".into(), Value::from(Ipv6Addr::from(v6).to_string()));
        }
        if !backend_type.is_empty() {
            obj.insert("BackendType".into(), Value::from(backend_type.clone()));
        }
        if let Some(d) = &data {
            obj.insert("BackendData".into(), d.clone());
        }
        if let Some(d) = &data6 {
            obj.insert("BackendV6Data".into(), d.clone());
        }
        let attrs = LeaseAttrs::from_json("k", Value::Object(obj).to_string().as_bytes())
            .expect("valid attributes parse");
        prop_assert_eq!(attrs.public_ip, Ipv4Addr::from(ip));
        prop_assert_eq!(attrs.public_ipv6, ip6.map(Ipv6Addr::from));
        prop_assert_eq!(&attrs.backend_type, &backend_type);
        let json = attrs.to_json();
        let back = LeaseAttrs::from_json("k", json.as_bytes()).expect("our own output parses");
        prop_assert_eq!(back.to_json(), json.clone());
        // Backend data is carried verbatim (it is the peer's, not ours to rewrite).
        let raw = |r: &Option<Box<serde_json::value::RawValue>>| r.as_ref().map(|r| r.get().to_owned());
        prop_assert_eq!(raw(&back.backend_data), data.map(|d| d.to_string()));
        prop_assert_eq!(raw(&back.backend_v6_data), data6.map(|d| d.to_string()));
    }

    #[test]
    fn subnet_key_parse_never_panics_and_reparses_its_display(
        s in prop_oneof![
            ".{0,40}",
            "[0-9.\\-&:a-f/+]{0,40}",
            (any::<u32>(), 0u8..=40).prop_map(|(ip, l)| format!("{}-{l}", Ipv4Addr::from(ip))),
        ]
    ) {
        if let Ok(key) = SubnetKey::parse(&s) {
            let shown = key.to_string();
            let again = SubnetKey::parse(&shown).expect("Display output parses");
            prop_assert_eq!(again.to_string(), shown);
            prop_assert_eq!(again.ipv4, key.ipv4);
        }
    }

    #[test]
    fn subnet_keys_round_trip_through_display(
        ip in any::<u32>(),
        len in 0u8..=32,
        v6 in prop::option::of((any::<u128>(), 0u8..=128)),
    ) {
        let ipv4 = Ipv4Network::new(Ipv4Addr::from(ip), len).expect("len <= 32");
        let ipv4 = Ipv4Network::new(ipv4.network(), len).expect("len <= 32");
        let ipv6 = v6.map(|(ip, len)| {
            let n = Ipv6Network::new(Ipv6Addr::from(ip), len).expect("len <= 128");
            Ipv6Network::new(n.network(), len).expect("len <= 128")
        });
        let key = SubnetKey { ipv4, ipv6 };
        let shown = key.to_string();
        prop_assert_eq!(SubnetKey::parse(&shown).expect("Display output parses"), key);
    }

    #[test]
    fn flags_never_panic(
        args in prop::collection::vec(
            prop_oneof![
                Just("-etcd-endpoints".to_owned()),
                Just("--etcd-endpoints=http://192.0.2.1:2379".to_owned()),
                Just("-iface".to_owned()),
                Just("-iface-regex=[".to_owned()),
                Just("-public-ip".to_owned()),
                Just("-subnet-lease-ttl".to_owned()),
                Just("-healthz-port=-1".to_owned()),
                Just("-ip-masq".to_owned()),
                Just("-v".to_owned()),
                Just("-v=10".to_owned()),
                Just("--".to_owned()),
                Just("-".to_owned()),
                Just("-udp-dataplane=ebpf".to_owned()),
                "-{1,2}[a-z-]{1,20}(=.{0,10})?",
                ".{0,20}",
            ],
            0..8,
        )
    ) {
        let argv = std::iter::once("flanneld".to_owned()).chain(args);
        let _ = Flags::parse_go_style(argv);
    }
}
