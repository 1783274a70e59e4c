//! The one place that speaks raw `cryptoki-sys`: templates carrying `CKA_UNWRAP_TEMPLATE`.
//!
//! cryptoki 0.12.1 has no `Attribute` for `CKA_UNWRAP_TEMPLATE` (DESIGN, "HSM facts"), so objects
//! that carry one are created through the raw function list. Measured on SoftHSM2 2.6.1: the
//! attributes of a template are applied in order and `CKA_MODIFIABLE=false` must come last, or
//! the attributes after it are refused; the template builder below always appends it last.

use crate::error::{CardError, Result};
use cryptoki::error::Rv;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{
    CKA_MODIFIABLE, CKA_UNWRAP_TEMPLATE, CKM_AES_KEY_WRAP, CK_ATTRIBUTE, CK_BBOOL, CK_MECHANISM,
    CK_OBJECT_HANDLE, CK_ULONG,
};
use std::sync::OnceLock;

/// A template, optionally with a nested unwrap template (which may nest again).
#[derive(Clone, Debug, Default)]
pub struct Template {
    pub attrs: Vec<Attribute>,
    pub unwrap: Option<Box<Template>>,
    /// Append `CKA_MODIFIABLE=false` (last, see module doc).
    pub frozen: bool,
}

impl Template {
    pub fn new(attrs: Vec<Attribute>) -> Self {
        Template {
            attrs,
            unwrap: None,
            frozen: false,
        }
    }
    pub fn with_unwrap(mut self, t: Template) -> Self {
        self.unwrap = Some(Box::new(t));
        self
    }
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }
}

/// Raw attribute arrays kept alive while a call runs (pointers into `Template` and children).
struct Built {
    attrs: Vec<CK_ATTRIBUTE>,
    _child: Option<Box<Built>>,
    _false: Box<CK_BBOOL>,
}

fn build(t: &Template) -> Built {
    let mut attrs: Vec<CK_ATTRIBUTE> = t.attrs.iter().map(CK_ATTRIBUTE::from).collect();
    let child = t.unwrap.as_ref().map(|c| Box::new(build(c)));
    if let Some(c) = &child {
        attrs.push(CK_ATTRIBUTE {
            type_: CKA_UNWRAP_TEMPLATE,
            pValue: c.attrs.as_ptr() as *mut _,
            ulValueLen: (c.attrs.len() * std::mem::size_of::<CK_ATTRIBUTE>()) as CK_ULONG,
        });
    }
    let fals = Box::new(0 as CK_BBOOL);
    if t.frozen {
        attrs.push(CK_ATTRIBUTE {
            type_: CKA_MODIFIABLE,
            pValue: &*fals as *const CK_BBOOL as *mut _,
            ulValueLen: 1,
        });
    }
    Built {
        attrs,
        _child: child,
        _false: fals,
    }
}

fn lib() -> Result<&'static cryptoki_sys::Pkcs11> {
    static RAW: OnceLock<std::result::Result<cryptoki_sys::Pkcs11, String>> = OnceLock::new();
    let module = crate::hsm::module_path()
        .ok_or_else(|| CardError::Config("PKCS#11 module not initialised".into()))?;
    // dlopen of the path the context already loaded returns the same handle, so these function
    // pointers act on the one initialised library instance (no second C_Initialize).
    RAW.get_or_init(|| unsafe { cryptoki_sys::Pkcs11::new(module).map_err(|e| e.to_string()) })
        .as_ref()
        .map_err(|e| CardError::Config(format!("loading PKCS#11 module: {e}")))
}

fn check(rv: cryptoki_sys::CK_RV, f: cryptoki::context::Function) -> Result<()> {
    Rv::from(rv).into_result(f).map_err(CardError::from)
}

/// `C_UnwrapKey` with `CKM_AES_KEY_WRAP` (RFC 3394) and a template that may carry an unwrap
/// template.
pub fn unwrap_aes_kw(
    session: &Session,
    wrapping: ObjectHandle,
    wrapped: &[u8],
    template: &Template,
) -> Result<ObjectHandle> {
    let lib = lib()?;
    let mut built = build(template);
    let mut mech = CK_MECHANISM {
        mechanism: CKM_AES_KEY_WRAP,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    };
    let mut wrapped = wrapped.to_vec();
    let mut out: CK_OBJECT_HANDLE = 0;
    let rv = unsafe {
        lib.C_UnwrapKey(
            session.handle(),
            &mut mech,
            wrapping.handle(),
            wrapped.as_mut_ptr(),
            wrapped.len() as CK_ULONG,
            built.attrs.as_mut_ptr(),
            built.attrs.len() as CK_ULONG,
            &mut out,
        )
    };
    check(rv, cryptoki::context::Function::UnwrapKey)?;
    // SAFETY: `out` was just returned by the module as a live object handle of this session.
    Ok(unsafe { ObjectHandle::new_from_raw(out) })
}

/// `C_CreateObject` with a template that may carry an unwrap template.
pub fn create_object(session: &Session, template: &Template) -> Result<ObjectHandle> {
    let lib = lib()?;
    let mut built = build(template);
    let mut out: CK_OBJECT_HANDLE = 0;
    let rv = unsafe {
        lib.C_CreateObject(
            session.handle(),
            built.attrs.as_mut_ptr(),
            built.attrs.len() as CK_ULONG,
            &mut out,
        )
    };
    check(rv, cryptoki::context::Function::CreateObject)?;
    // SAFETY: `out` was just returned by the module as a live object handle of this session.
    Ok(unsafe { ObjectHandle::new_from_raw(out) })
}

/// `C_SetAttributeValue` with a raw template (used by the threat-model spike to try to loosen an
/// object's unwrap template).
pub fn set_attributes(session: &Session, object: ObjectHandle, template: &Template) -> Result<()> {
    let lib = lib()?;
    let mut built = build(template);
    let rv = unsafe {
        lib.C_SetAttributeValue(
            session.handle(),
            object.handle(),
            built.attrs.as_mut_ptr(),
            built.attrs.len() as CK_ULONG,
        )
    };
    check(rv, cryptoki::context::Function::SetAttributeValue)
}

/// Length in attributes of an object's `CKA_UNWRAP_TEMPLATE` (0 when absent), for audits.
pub fn unwrap_template_len(session: &Session, object: ObjectHandle) -> Result<usize> {
    let lib = lib()?;
    let mut a = CK_ATTRIBUTE {
        type_: CKA_UNWRAP_TEMPLATE,
        pValue: std::ptr::null_mut(),
        ulValueLen: 0,
    };
    let rv = unsafe { lib.C_GetAttributeValue(session.handle(), object.handle(), &mut a, 1) };
    if rv != cryptoki_sys::CKR_OK {
        return Ok(0);
    }
    if a.ulValueLen == CK_ULONG::MAX {
        return Ok(0);
    }
    Ok(a.ulValueLen as usize / std::mem::size_of::<CK_ATTRIBUTE>())
}
