/*
 * Omni Proxy nginx module: the front door's access checks, a module of its
 * own in the same .so (it shares nothing with the scheduler).
 *
 *   omni_methods GET HEAD;          other methods get 405 with Allow
 *   omni_api_key KEY | off;         requires "Authorization: Bearer KEY"
 *   omni_api_key_file PATH;         the same, the key read from a file
 *
 * Both answer in the access phase with an OpenAI-style JSON error of their
 * own: going through error_page would lose the Allow and WWW-Authenticate
 * headers.  Keys are compared in time that depends on the configured key's
 * length only, never on where a guess first differs.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


/* a key file is one line; larger files are not what the operator meant */
#define NGX_HTTP_OMNI_ACCESS_KEY_MAX  4096


typedef struct {
    ngx_str_t    key;           /* unset: inherit; empty: none required */
    ngx_uint_t   methods;       /* NGX_HTTP_* bits; 0: any method */
    ngx_str_t    allow;         /* the Allow header's value for a 405 */
} ngx_http_omni_access_loc_conf_t;


static ngx_int_t ngx_http_omni_access_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_omni_access_reject(ngx_http_request_t *r,
    ngx_uint_t status, const char *type, ngx_str_t *message,
    ngx_table_elt_t **header, const char *name, ngx_str_t *value);
static ngx_uint_t ngx_http_omni_access_key_ok(ngx_str_t *key,
    ngx_str_t *auth);
static char *ngx_http_omni_access_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_omni_access_key_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_omni_access_check_key(ngx_conf_t *cf, ngx_str_t *key,
    const char *from);
static char *ngx_http_omni_access_methods(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static void *ngx_http_omni_access_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_omni_access_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_omni_access_init(ngx_conf_t *cf);


static ngx_command_t  ngx_http_omni_access_commands[] = {

    { ngx_string("omni_methods"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_omni_access_methods,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("omni_api_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_omni_access_key,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("omni_api_key_file"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_omni_access_key_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_omni_access_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_omni_access_init,             /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_omni_access_create_loc_conf,  /* create location configuration */
    ngx_http_omni_access_merge_loc_conf    /* merge location configuration */
};


ngx_module_t  ngx_http_omni_access_module = {
    NGX_MODULE_V1,
    &ngx_http_omni_access_module_ctx,      /* module context */
    ngx_http_omni_access_commands,         /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


typedef struct {
    ngx_str_t    name;
    ngx_uint_t   bit;
} ngx_http_omni_access_method_t;


static ngx_http_omni_access_method_t  ngx_http_omni_access_method_names[] = {
    { ngx_string("GET"),     NGX_HTTP_GET },
    { ngx_string("HEAD"),    NGX_HTTP_HEAD },
    { ngx_string("POST"),    NGX_HTTP_POST },
    { ngx_string("PUT"),     NGX_HTTP_PUT },
    { ngx_string("DELETE"),  NGX_HTTP_DELETE },
    { ngx_string("OPTIONS"), NGX_HTTP_OPTIONS },
    { ngx_string("PATCH"),   NGX_HTTP_PATCH },
    { ngx_null_string, 0 }
};


static ngx_str_t  ngx_http_omni_access_bearer = ngx_string("Bearer");
static ngx_str_t  ngx_http_omni_access_missing =
    ngx_string("this route requires Authorization: Bearer <key>");
static ngx_str_t  ngx_http_omni_access_wrong =
    ngx_string("the key sent in Authorization is not valid");
static ngx_str_t  ngx_http_omni_access_challenge =
    ngx_string("Bearer realm=\"omni\"");
static ngx_str_t  ngx_http_omni_access_invalid =
    ngx_string("Bearer realm=\"omni\", error=\"invalid_token\"");


static ngx_int_t
ngx_http_omni_access_handler(ngx_http_request_t *r)
{
    u_char                           *p;
    ngx_str_t                         msg, auth;
    ngx_http_omni_access_loc_conf_t  *alcf;

    /* subrequests (the P/D legs) were checked as their parent */
    if (r != r->main) {
        return NGX_DECLINED;
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_omni_access_module);

    if (alcf->methods && !(r->method & alcf->methods)) {
        p = ngx_pnalloc(r->pool, r->method_name.len + alcf->allow.len + 64);
        if (p == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        /* method names are tokens (nginx checked them): safe in JSON */
        msg.data = p;
        msg.len = ngx_sprintf(p, "method %V is not allowed here, use %V",
                              &r->method_name, &alcf->allow) - p;

        return ngx_http_omni_access_reject(r, NGX_HTTP_NOT_ALLOWED,
                                           "invalid_request_error", &msg,
                                           NULL, "Allow", &alcf->allow);
    }

    if (alcf->key.len == 0) {
        return NGX_DECLINED;
    }

    if (r->headers_in.authorization == NULL) {
        return ngx_http_omni_access_reject(r, NGX_HTTP_UNAUTHORIZED,
                                           "authentication_error",
                                           &ngx_http_omni_access_missing,
                                           &r->headers_out.www_authenticate,
                                           "WWW-Authenticate",
                                           &ngx_http_omni_access_challenge);
    }

    auth = r->headers_in.authorization->value;

    if (auth.len <= ngx_http_omni_access_bearer.len
        || auth.data[ngx_http_omni_access_bearer.len] != ' '
        || ngx_strncasecmp(auth.data, ngx_http_omni_access_bearer.data,
                           ngx_http_omni_access_bearer.len) != 0)
    {
        return ngx_http_omni_access_reject(r, NGX_HTTP_UNAUTHORIZED,
                                           "authentication_error",
                                           &ngx_http_omni_access_missing,
                                           &r->headers_out.www_authenticate,
                                           "WWW-Authenticate",
                                           &ngx_http_omni_access_challenge);
    }

    auth.data += ngx_http_omni_access_bearer.len;
    auth.len -= ngx_http_omni_access_bearer.len;

    while (auth.len && auth.data[0] == ' ') {
        auth.data++;
        auth.len--;
    }

    if (ngx_http_omni_access_key_ok(&alcf->key, &auth)) {
        return NGX_DECLINED;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "omni: request with a wrong bearer key refused");

    return ngx_http_omni_access_reject(r, NGX_HTTP_UNAUTHORIZED,
                                       "authentication_error",
                                       &ngx_http_omni_access_wrong,
                                       &r->headers_out.www_authenticate,
                                       "WWW-Authenticate",
                                       &ngx_http_omni_access_invalid);
}


/*
 * Every byte of the configured key is compared whatever the guess, so the
 * time taken tells nothing about how much of a guess was right; a guess of
 * another length is compared against itself and then refused.
 */
static ngx_uint_t
ngx_http_omni_access_key_ok(ngx_str_t *key, ngx_str_t *auth)
{
    size_t            i;
    u_char            diff;
    volatile u_char  *guess;

    guess = auth->len == key->len ? auth->data : key->data;
    diff = (u_char) (auth->len != key->len);

    for (i = 0; i < key->len; i++) {
        diff |= (u_char) (guess[i] ^ key->data[i]);
    }

    return diff == 0;
}


/*
 * The whole answer is sent here and the request finalized: returning the
 * status would hand it to error_page, whose internal redirect drops the
 * header this answer is about.
 */
static ngx_int_t
ngx_http_omni_access_reject(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, ngx_str_t *message, ngx_table_elt_t **header,
    const char *name, ngx_str_t *value)
{
    u_char                    *p;
    size_t                     len;
    ngx_int_t                  rc;
    ngx_table_elt_t           *h;
    ngx_http_complex_value_t   cv;

    static ngx_str_t  json = ngx_string("application/json");

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value = *value;

    if (header) {
        *header = h;
    }

    len = sizeof("{\"error\": {\"message\": \"\", \"type\": \"\", "
                 "\"code\": 000}}\n") - 1 + message->len + ngx_strlen(type);

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_memzero(&cv, sizeof(ngx_http_complex_value_t));
    cv.value.data = p;
    cv.value.len = ngx_sprintf(p, "{\"error\": {\"message\": \"%V\", "
                               "\"type\": \"%s\", \"code\": %ui}}\n",
                               message, type, status)
                   - p;

    rc = ngx_http_send_response(r, status, &json, &cv);

    ngx_http_finalize_request(r, rc);

    return NGX_DONE;
}


static char *
ngx_http_omni_access_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_omni_access_loc_conf_t  *alcf = conf;

    ngx_str_t  *value;

    if (alcf->key.data != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        ngx_str_set(&alcf->key, "");
        return NGX_CONF_OK;
    }

    alcf->key = value[1];

    return ngx_http_omni_access_check_key(cf, &alcf->key, "the key");
}


static char *
ngx_http_omni_access_key_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_omni_access_loc_conf_t  *alcf = conf;

    u_char           *buf;
    ssize_t           n;
    ngx_fd_t          fd;
    ngx_str_t        *value, name;
    ngx_file_info_t   fi;

    if (alcf->key.data != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;
    name = value[1];

    if (ngx_conf_full_name(cf->cycle, &name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    fd = ngx_open_file(name.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_open_file_n " \"%V\" failed", &name);
        return NGX_CONF_ERROR;
    }

    buf = NULL;
    n = -1;

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_fd_info_n " \"%V\" failed", &name);

    } else if (ngx_file_size(&fi) > NGX_HTTP_OMNI_ACCESS_KEY_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" is larger than %d bytes: not a key file",
                           &name, NGX_HTTP_OMNI_ACCESS_KEY_MAX);

    } else {
        buf = ngx_pnalloc(cf->pool, NGX_HTTP_OMNI_ACCESS_KEY_MAX + 1);
        if (buf != NULL) {
            n = ngx_read_fd(fd, buf, NGX_HTTP_OMNI_ACCESS_KEY_MAX + 1);
            if (n == -1) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                                   ngx_read_fd_n " \"%V\" failed", &name);
            }
        }
    }

    if (ngx_close_file(fd) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_ALERT, cf, ngx_errno,
                           ngx_close_file_n " \"%V\" failed", &name);
    }

    if (n < 0 || n > NGX_HTTP_OMNI_ACCESS_KEY_MAX) {
        return NGX_CONF_ERROR;
    }

    /* the key is the file's text without its line end */
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) {
        n--;
    }

    alcf->key.data = buf;
    alcf->key.len = n;

    return ngx_http_omni_access_check_key(cf, &alcf->key, (char *) name.data);
}


/* a key a client could not send in a header is a configuration error */
static char *
ngx_http_omni_access_check_key(ngx_conf_t *cf, ngx_str_t *key,
    const char *from)
{
    size_t  i;

    if (key->len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%s: the key is empty",
                           from);
        return NGX_CONF_ERROR;
    }

    for (i = 0; i < key->len; i++) {
        if (key->data[i] <= ' ' || key->data[i] >= 0x7f) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "%s: the key has a space or a character "
                               "other than printable ASCII", from);
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_omni_access_methods(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_omni_access_loc_conf_t  *alcf = conf;

    u_char                         *p;
    size_t                          len;
    ngx_str_t                      *value;
    ngx_uint_t                      i;
    ngx_http_omni_access_method_t  *m;

    if (alcf->methods != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;
    alcf->methods = 0;
    len = 0;

    for (i = 1; i < cf->args->nelts; i++) {
        for (m = ngx_http_omni_access_method_names; m->name.len; m++) {
            if (value[i].len == m->name.len
                && ngx_strncmp(value[i].data, m->name.data, m->name.len) == 0)
            {
                break;
            }
        }

        if (m->name.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "unknown method \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        alcf->methods |= m->bit;
        len += value[i].len + 2;
    }

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    alcf->allow.data = p;

    for (i = 1; i < cf->args->nelts; i++) {
        if (i > 1) {
            *p++ = ','; *p++ = ' ';
        }
        p = ngx_cpymem(p, value[i].data, value[i].len);
    }

    alcf->allow.len = p - alcf->allow.data;

    return NGX_CONF_OK;
}


static void *
ngx_http_omni_access_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_omni_access_loc_conf_t  *alcf;

    alcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_omni_access_loc_conf_t));
    if (alcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     alcf->key = { 0, NULL };
     *     alcf->allow = { 0, NULL };
     */

    alcf->methods = NGX_CONF_UNSET_UINT;

    return alcf;
}


static char *
ngx_http_omni_access_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_omni_access_loc_conf_t  *prev = parent;
    ngx_http_omni_access_loc_conf_t  *conf = child;

    if (conf->key.data == NULL) {
        conf->key = prev->key;
    }

    if (conf->methods == NGX_CONF_UNSET_UINT) {
        conf->methods = prev->methods == NGX_CONF_UNSET_UINT
                        ? 0 : prev->methods;
        conf->allow = prev->allow;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_omni_access_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_omni_access_handler;

    return NGX_OK;
}
