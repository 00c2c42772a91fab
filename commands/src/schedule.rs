//! The scheduler: pure. Filters the hosts that can satisfy every USB request of a flavor with
//! free devices and controller ports, records why each rejected host was rejected, and weighs
//! the survivors. It reads the view only through index-backed queries (devices matching a
//! vendor:product, one device, one lineage), never a scan of every host.

use std::collections::{BTreeMap, BTreeSet};

use usbpt_schemas::{
    AssignedDevice, ControllerModel, DeviceId, DeviceSelector, FollowPolicy, HostName,
    HostRejection, LineageId, ServerId, UsbRequest,
};

use crate::view::{DeviceInfo, DeviceStatus, ViewError, ViewRead};

/// How to choose among hosts that can all take the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weigh {
    /// Fill hosts in name order (first fit): the first host that can take the server does,
    /// so hosts fill up one after another. Reads only the hosts it tries. (With a forced host,
    /// a held device or an enumeration/lineage request, the host with the fewest free matching
    /// devices.)
    #[default]
    Pack,
    /// Prefer the host with the most free matching devices.
    Spread,
}

/// What to schedule.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub usb: &'a [UsbRequest],
    /// The operator's forced host, if any.
    pub host: Option<&'a HostName>,
    /// The server being (re)scheduled: lineages it already holds count as free for it (resize).
    pub server: Option<ServerId>,
    pub weigh: Weigh,
    /// The deciding process's pack lane ([`crate::decide::Ctx::lane`]).
    pub lane: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: HostName,
    pub devices: Vec<AssignedDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoHost {
    pub reason: String,
    pub host_rejections: Vec<HostRejection>,
}

/// The flavor-level check: one controller per model, so the devices on a model must fit its
/// ports. Returns the offending model, its ports and what the flavor needs.
pub fn check_ports(usb: &[UsbRequest]) -> Result<(), (ControllerModel, u8, u16)> {
    let mut need: BTreeMap<ControllerModel, u16> = BTreeMap::new();
    for r in usb {
        *need.entry(r.controller).or_default() += r.device_count();
    }
    for (model, n) in need {
        if n > u16::from(model.ports()) {
            return Err((model, model.ports(), n));
        }
    }
    Ok(())
}

/// Candidate devices of one request, per host.
type Candidates = BTreeMap<HostName, Vec<DeviceInfo>>;

fn usable(
    d: &DeviceInfo,
    server: Option<ServerId>,
    view: &dyn ViewRead,
) -> Result<bool, ViewError> {
    if d.status == DeviceStatus::Invalidated {
        return Ok(false);
    }
    Ok(match view.claim(&d.lineage_id)? {
        None => true,
        Some(c) => Some(c.server_id) == server,
    })
}

fn describe(r: &UsbRequest) -> String {
    match &r.selector {
        DeviceSelector::Enumeration(d) => format!("device {d}"),
        DeviceSelector::Lineage(l) => format!("lineage {l}"),
        DeviceSelector::Match {
            vendor_id,
            product_id,
            serial,
            count,
        } => {
            let s = serial
                .as_ref()
                .map(|s| format!(" serial {s}"))
                .unwrap_or_default();
            format!("{count} × {vendor_id}:{product_id}{s}")
        }
    }
}

/// The devices that could serve request `r`, per host, or why none can anywhere.
fn candidates(
    r: &UsbRequest,
    req: &Request<'_>,
    view: &dyn ViewRead,
) -> Result<Result<Candidates, String>, ViewError> {
    let one = |d: DeviceInfo| -> Candidates { BTreeMap::from([(d.host.clone(), vec![d])]) };
    let by_lineage = |lineage: &LineageId,
                      what: String|
     -> Result<Result<Candidates, String>, ViewError> {
        let Some(cur) = view.current_enumeration(lineage)? else {
            return Ok(Err(format!("{what} is unknown")));
        };
        if cur.status == DeviceStatus::Invalidated {
            return Ok(Err(format!(
                "{what} has no present enumeration (its last, {} on {}, was invalidated)",
                cur.device_id, cur.host
            )));
        }
        // A lineage in conflict is not schedulable until one side goes or an operator
        // keeps one (ADR 0011); matches by vendor and product skip it in the free index.
        if let Some(c) = view.lineage_alarms(lineage)?.conflict {
            return Ok(Err(format!(
                    "{what} (now {} on {}) is also present on host {} (lineage_conflict): \
                     unplug one copy or keep one with `usbpt conflict resolve {lineage} --keep HOST`",
                    cur.device_id, cur.host, c.held_back.0
                )));
        }
        if !usable(&cur, req.server, view)? {
            let holder = cur.holder.map(|s| s.to_string()).unwrap_or_default();
            return Ok(Err(format!(
                "{what} (now {} on {}) is already claimed by server {holder}",
                cur.device_id, cur.host
            )));
        }
        Ok(Ok(one(cur)))
    };
    match &r.selector {
        DeviceSelector::Enumeration(id) => {
            let Some(d) = view.device(id)? else {
                return Ok(Err(format!("device {id} is unknown")));
            };
            match r.follow {
                // Bound to enumeration N, following its lineage to the current enumeration.
                FollowPolicy::Lineage => {
                    by_lineage(&d.lineage_id, format!("device {id}'s lineage"))
                }
                FollowPolicy::Strict => {
                    if d.status == DeviceStatus::Invalidated {
                        return Ok(Err(format!(
                            "device {id} was invalidated and the request is strict (resize to a flavor with its new enumeration)"
                        )));
                    }
                    if !usable(&d, req.server, view)? {
                        return Ok(Err(format!("device {id} is already claimed")));
                    }
                    Ok(Ok(one(d)))
                }
            }
        }
        DeviceSelector::Lineage(l) => by_lineage(l, format!("lineage {l}")),
        DeviceSelector::Match {
            vendor_id,
            product_id,
            serial,
            ..
        } => {
            let mut map = view.free_devices_matching(*vendor_id, *product_id, serial.as_deref())?;
            for list in map.values_mut() {
                list.sort_by_key(|d| d.device_id);
            }
            map.retain(|_, v| !v.is_empty());
            if map.is_empty() {
                return Ok(Err(format!("no free {vendor_id}:{product_id} on any host")));
            }
            Ok(Ok(map))
        }
    }
}

/// Adds the devices `server` already holds to the candidates of the requests they match.
fn add_held(held: &[DeviceInfo], r: &UsbRequest, cands: &mut Candidates) {
    if let DeviceSelector::Match {
        vendor_id,
        product_id,
        serial,
        ..
    } = &r.selector
    {
        for d in held {
            let fits = d.vendor_id == *vendor_id
                && d.product_id == *product_id
                && serial.as_ref().is_none_or(|s| d.serial.as_ref() == Some(s));
            if fits && d.status != DeviceStatus::Invalidated {
                let list = cands.entry(d.host.clone()).or_default();
                if !list.iter().any(|x| x.device_id == d.device_id) {
                    list.push(d.clone());
                    list.sort_by_key(|d| d.device_id);
                }
            }
        }
    }
}

/// Picks distinct devices on `host` for every request from `lists` (one candidate list per
/// request), starting each at an offset drawn from the server id so that concurrent boots in
/// other processes mostly pick different devices instead of all racing for one.
fn assign(
    host: &HostName,
    req: &Request<'_>,
    lists: &[&[DeviceInfo]],
) -> Result<Vec<AssignedDevice>, HostRejection> {
    let mut taken: BTreeSet<DeviceId> = BTreeSet::new();
    let mut devices = Vec::new();
    for (i, (r, list)) in req.usb.iter().zip(lists).enumerate() {
        let need = usize::from(r.device_count());
        let offset = req
            .server
            .map_or(0, |s| (s.0.as_u128() % list.len().max(1) as u128) as usize);
        let picked: Vec<&DeviceInfo> = list[offset..]
            .iter()
            .chain(&list[..offset])
            .filter(|d| !taken.contains(&d.device_id))
            .take(need)
            .collect();
        if picked.len() < need {
            return Err(HostRejection {
                host: host.clone(),
                reason: format!(
                    "request {i} ({}): needs {need} free, host has {}",
                    describe(r),
                    picked.len()
                ),
            });
        }
        for d in picked {
            taken.insert(d.device_id);
            devices.push(AssignedDevice {
                request_index: u16::try_from(i).unwrap_or(u16::MAX),
                device_id: d.device_id,
                lineage_id: d.lineage_id,
                controller: r.controller,
                follow: r.follow,
            });
        }
    }
    Ok(devices)
}

/// Among how many of the first hosts with a free match pack draws where to start.
pub const PACK_SUBSET: usize = 4;

/// Over how many of the first hosts with a free match the lanes of several processes spread
/// (ADR 0010): each process's boots start at its own one of them.
pub const PACK_LANES: usize = 64;

/// Hosts whose rejection reasons are recorded one by one; beyond them, a count.
const REJECTIONS_SHOWN: usize = 32;

/// Pack, first fit: walk the hosts that have a free device for the first request, in name
/// order, one index key at a time, and take the first that satisfies every request. Reads
/// only the hosts it tries, whatever the number of hosts. (Only for flavors whose requests
/// are all vendor/product matches, with no forced host and nothing already held.)
fn first_fit(
    req: &Request<'_>,
    view: &dyn ViewRead,
) -> Result<Result<Placement, NoHost>, ViewError> {
    let Some(DeviceSelector::Match {
        vendor_id,
        product_id,
        ..
    }) = req.usb.first().map(|r| &r.selector)
    else {
        return Ok(Err(NoHost {
            reason: "first fit needs a vendor/product request".into(),
            host_rejections: Vec::new(),
        }));
    };
    let mut rejections = Vec::new();
    let mut tried = 0usize;
    // Nova's host_subset_size, on index keys only: of the first PACK_SUBSET hosts with a free
    // match, one drawn from the server id is where first fit starts (wrapping round to the
    // hosts before it), so concurrent boots in several handlers mostly claim on different
    // hosts (ADR 0010) while reading one host's devices when it fits.
    // A process with a lane other than 0 reads further (PACK_LANES keys) and starts at its lane's
    // host, so handlers in several processes pack different hosts at once.
    let reach = if req.lane == 0 {
        PACK_SUBSET
    } else {
        PACK_LANES
    };
    let mut firsts: Vec<HostName> = Vec::with_capacity(reach);
    while firsts.len() < reach {
        match view.next_host_with_free(*vendor_id, *product_id, firsts.last())? {
            Some(h) => firsts.push(h),
            None => break,
        }
    }
    let n = firsts.len().max(1);
    // Lane 0 draws among the first PACK_SUBSET hosts by server id; a lane starts at its own host
    // (its process's decisions in flight spread by themselves: the overlay hides their devices).
    let pick = if req.lane == 0 {
        req.server
            .map_or(0, |s| ((s.0.as_u128() >> 7) % n as u128) as usize)
    } else {
        (req.lane % n as u64) as usize
    };
    let start: Option<HostName> = pick.checked_sub(1).map(|i| firsts[i].clone());
    let mut after = start.clone();
    let mut wrapped = start.is_none();
    loop {
        let host = match view.next_host_with_free(*vendor_id, *product_id, after.as_ref())? {
            Some(h) if wrapped && start.as_ref().is_some_and(|s| &h > s) => break,
            Some(h) => h,
            None if !wrapped => {
                wrapped = true;
                after = None;
                continue;
            }
            None => break,
        };
        tried += 1;
        let mut lists = Vec::with_capacity(req.usb.len());
        for r in req.usb {
            let DeviceSelector::Match {
                vendor_id,
                product_id,
                serial,
                ..
            } = &r.selector
            else {
                return Ok(Err(NoHost {
                    reason: "first fit needs vendor/product requests".into(),
                    host_rejections: Vec::new(),
                }));
            };
            let mut list =
                view.free_on_host_matching(&host, *vendor_id, *product_id, serial.as_deref())?;
            list.sort_by_key(|d| d.device_id);
            lists.push(list);
        }
        let slices: Vec<&[DeviceInfo]> = lists.iter().map(Vec::as_slice).collect();
        match assign(&host, req, &slices) {
            Ok(devices) => return Ok(Ok(Placement { host, devices })),
            Err(r) => {
                if rejections.len() < REJECTIONS_SHOWN {
                    rejections.push(r);
                }
            }
        }
        after = Some(host);
    }
    let reason = if tried == 0 {
        format!(
            "no host can satisfy request 0 ({}): no free {vendor_id}:{product_id} on any host",
            describe(&req.usb[0])
        )
    } else if tried > rejections.len() {
        format!(
            "no host can satisfy every request ({tried} host(s) considered; the first {} are listed)",
            rejections.len()
        )
    } else {
        format!("no host can satisfy every request ({tried} host(s) considered)")
    };
    Ok(Err(NoHost {
        reason,
        host_rejections: rejections,
    }))
}

/// Places a server: a host and a device for every requested device, or why not.
pub fn schedule(
    req: &Request<'_>,
    held: &[DeviceInfo],
    view: &dyn ViewRead,
) -> Result<Result<Placement, NoHost>, ViewError> {
    if let Err((model, ports, need)) = check_ports(req.usb) {
        return Ok(Err(NoHost {
            reason: format!(
                "controller {} has {ports} ports and the flavor needs {need}",
                model.as_str()
            ),
            host_rejections: Vec::new(),
        }));
    }
    let all_match = !req.usb.is_empty()
        && req
            .usb
            .iter()
            .all(|r| matches!(r.selector, DeviceSelector::Match { .. }));
    if req.weigh == Weigh::Pack && req.host.is_none() && held.is_empty() && all_match {
        return first_fit(req, view);
    }
    let mut per_request = Vec::with_capacity(req.usb.len());
    for (i, r) in req.usb.iter().enumerate() {
        let (mut c, why) = match candidates(r, req, view)? {
            Ok(c) => (c, None),
            Err(why) => (BTreeMap::new(), Some(why)),
        };
        add_held(held, r, &mut c);
        if c.is_empty() {
            let why = why.unwrap_or_else(|| "no free device".to_owned());
            return Ok(Err(NoHost {
                reason: format!("no host can satisfy request {i} ({}): {why}", describe(r)),
                host_rejections: Vec::new(),
            }));
        }
        per_request.push(c);
    }

    // Every host that can serve at least one request is a candidate; a flavor with no USB
    // requests can run on any host with an agent (every such host weighs the same: the first in
    // name order wins).
    let mut hosts: BTreeSet<HostName> =
        per_request.iter().flat_map(|c| c.keys().cloned()).collect();
    if let Some(forced) = req.host {
        hosts = BTreeSet::from([forced.clone()]);
    } else if req.usb.is_empty() {
        hosts = view.agent_hosts()?.into_iter().collect();
    }
    if hosts.is_empty() {
        return Ok(Err(NoHost {
            reason: "the flavor requests no USB device and no host has an agent".to_owned(),
            host_rejections: Vec::new(),
        }));
    }

    let mut rejections = Vec::new();
    let mut feasible: Vec<(usize, Placement)> = Vec::new();
    for host in hosts {
        let lists: Vec<&[DeviceInfo]> = per_request
            .iter()
            .map(|c| c.get(&host).map(Vec::as_slice).unwrap_or(&[]))
            .collect();
        let pool = lists.iter().map(|l| l.len()).sum();
        match assign(&host, req, &lists) {
            Ok(devices) => feasible.push((pool, Placement { host, devices })),
            Err(r) => rejections.push(r),
        }
    }
    let best = match req.weigh {
        Weigh::Pack => feasible
            .into_iter()
            .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.host.cmp(&b.1.host))),
        Weigh::Spread => feasible
            .into_iter()
            .min_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.host.cmp(&b.1.host))),
    };
    Ok(match best {
        Some((_, p)) => Ok(p),
        None => Err(NoHost {
            reason: format!(
                "no host can satisfy every request ({} host(s) considered)",
                rejections.len()
            ),
            host_rejections: rejections,
        }),
    })
}
