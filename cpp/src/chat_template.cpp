// A small Jinja interpreter for chat templates (see chat_template.h for the subset).
//
// Three stages, as in jinja2: the lexer splits the source into text and tags and applies the
// whitespace rules (trim_blocks, lstrip_blocks, "-" markers) exactly as jinja2's lexer does; a
// recursive-descent parser builds statements and expressions with jinja2's operator precedence;
// render() walks them over values that are plain data (none, bool, int, string, list, map).
#include "flexquant/chat_template.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <unordered_map>
#include <utility>

namespace flexquant {

namespace {

// ---- values -----------------------------------------------------------------------------------

struct Value;
using List = std::vector<Value>;
using Map = std::vector<std::pair<std::string, Value>>;

struct Value {
    enum Kind { UNDEFINED, NONE, BOOL, INT, STR, LIST, MAP } kind = UNDEFINED;
    bool b = false;
    int64_t i = 0;
    std::string s;
    std::shared_ptr<const List> list;
    std::shared_ptr<const Map> map;

    static Value none() { Value v; v.kind = NONE; return v; }
    static Value boolean(bool x) { Value v; v.kind = BOOL; v.b = x; return v; }
    static Value integer(int64_t x) { Value v; v.kind = INT; v.i = x; return v; }
    static Value str(std::string x) { Value v; v.kind = STR; v.s = std::move(x); return v; }
    static Value of_list(List x) { Value v; v.kind = LIST; v.list = std::make_shared<const List>(std::move(x)); return v; }
    static Value of_map(Map x) { Value v; v.kind = MAP; v.map = std::make_shared<const Map>(std::move(x)); return v; }

    bool truthy() const {
        switch (kind) {
            case UNDEFINED: case NONE: return false;
            case BOOL: return b;
            case INT: return i != 0;
            case STR: return !s.empty();
            case LIST: return !list->empty();
            case MAP: return !map->empty();
        }
        return false;
    }
    const Value* key(const std::string& k) const {
        if (kind != MAP) return nullptr;
        for (const auto& [name, v] : *map) {
            if (name == k) return &v;
        }
        return nullptr;
    }
};

const char* kind_name(Value::Kind k) {
    static const char* names[] = {"undefined", "none", "bool", "int", "string", "list", "dict"};
    return names[k];
}

bool equal(const Value& a, const Value& b) {
    if (a.kind == Value::INT && b.kind == Value::BOOL) return a.i == int64_t(b.b);
    if (a.kind == Value::BOOL && b.kind == Value::INT) return int64_t(a.b) == b.i;
    if (a.kind != b.kind) return false;
    switch (a.kind) {
        case Value::UNDEFINED: case Value::NONE: return true;
        case Value::BOOL: return a.b == b.b;
        case Value::INT: return a.i == b.i;
        case Value::STR: return a.s == b.s;
        case Value::LIST:
            if (a.list->size() != b.list->size()) return false;
            for (size_t k = 0; k < a.list->size(); ++k) {
                if (!equal((*a.list)[k], (*b.list)[k])) return false;
            }
            return true;
        case Value::MAP: return a.map == b.map;
    }
    return false;
}

// Python's str() of a value, as {{ }} prints it.
std::string to_text(const Value& v) {
    switch (v.kind) {
        case Value::UNDEFINED: return "";
        case Value::NONE: return "None";
        case Value::BOOL: return v.b ? "True" : "False";
        case Value::INT: return std::to_string(v.i);
        case Value::STR: return v.s;
        default: throw Error(std::string("chat template: cannot print a ") + kind_name(v.kind));
    }
}

// Python's str.strip() family on ASCII white space (the templates strip message text; non-ASCII
// white space at the ends of a message is kept, where Python would strip it too).
std::string strip(const std::string& s, bool left, bool right, const std::string& chars = " \t\n\r\f\v") {
    size_t a = 0, b = s.size();
    if (left) while (a < b && chars.find(s[a]) != std::string::npos) ++a;
    if (right) while (b > a && chars.find(s[b - 1]) != std::string::npos) --b;
    return s.substr(a, b - a);
}

std::string ascii_case(std::string s, bool upper) {
    for (char& c : s) {
        if (upper && c >= 'a' && c <= 'z') c = static_cast<char>(c - 32);
        if (!upper && c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
    }
    return s;
}

int64_t utf8_length(const std::string& s) {
    int64_t n = 0;
    for (char c : s) n += (static_cast<uint8_t>(c) & 0xC0) != 0x80;
    return n;
}

// ---- expression tokens ------------------------------------------------------------------------

struct Tok {
    enum Kind { NAME, STRING, INT, OP, END } kind = END;
    std::string text;
    int64_t value = 0;
};

std::vector<Tok> lex_expr(const std::string& src, int line) {
    std::vector<Tok> out;
    size_t i = 0;
    const auto fail = [&](const std::string& what) {
        throw Error("chat template line " + std::to_string(line) + ": " + what + " in '" + src + "'");
    };
    while (i < src.size()) {
        const char c = src[i];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') { ++i; continue; }
        Tok t;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
            size_t j = i;
            while (j < src.size() && (std::isalnum(static_cast<unsigned char>(src[j])) || src[j] == '_')) ++j;
            t.kind = Tok::NAME;
            t.text = src.substr(i, j - i);
            i = j;
        } else if (c >= '0' && c <= '9') {
            size_t j = i;
            while (j < src.size() && src[j] >= '0' && src[j] <= '9') ++j;
            if (j < src.size() && src[j] == '.') fail("floating-point numbers are not supported");
            t.kind = Tok::INT;
            t.value = std::stoll(src.substr(i, j - i));
            i = j;
        } else if (c == '\'' || c == '"') {
            t.kind = Tok::STRING;
            size_t j = i + 1;
            for (;; ++j) {
                if (j >= src.size()) fail("unterminated string");
                if (src[j] == c) break;
                if (src[j] == '\\' && j + 1 < src.size()) {
                    const char e = src[++j];
                    switch (e) {
                        case 'n': t.text += '\n'; break;
                        case 't': t.text += '\t'; break;
                        case 'r': t.text += '\r'; break;
                        case '\\': case '\'': case '"': t.text += e; break;
                        default: t.text += '\\'; t.text += e;  // Python keeps unknown escapes
                    }
                } else {
                    t.text += src[j];
                }
            }
            i = j + 1;
        } else {
            static const char* two[] = {"==", "!=", "<=", ">=", "//", "**"};
            t.kind = Tok::OP;
            for (const char* op : two) {
                if (src.compare(i, 2, op) == 0) t.text = op;
            }
            if (t.text.empty()) {
                if (std::string("+-*/%~<>()[]{}.,:|=").find(c) == std::string::npos) fail(std::string("unexpected character '") + c + "'");
                t.text = std::string(1, c);
            }
            i += t.text.size();
        }
        out.push_back(std::move(t));
    }
    out.push_back(Tok{});
    return out;
}

// ---- expressions ------------------------------------------------------------------------------

struct Expr {
    enum Kind { LIT, VAR, ATTR, INDEX, SLICE, CALL, FILTER, TEST, NOT, NEG, BIN, AND, OR, COND, LIST } kind = LIT;
    Value lit;
    std::string name;  // VAR, ATTR, FILTER, TEST, BIN operator
    bool negate = false;  // TEST: "is not"
    std::vector<std::unique_ptr<Expr>> args;  // operands; CALL: callee first
};
using ExprP = std::unique_ptr<Expr>;

ExprP node(Expr::Kind k, std::string name = {}) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->name = std::move(name);
    return e;
}

// A node of `kind` whose first operand is `a` (postfix and infix operators).
ExprP on(ExprP a, Expr::Kind kind, std::string name = {}) {
    ExprP e = node(kind, std::move(name));
    e->args.push_back(std::move(a));
    return e;
}

class ExprParser {
public:
    ExprParser(std::vector<Tok> toks, int line, const std::string& src) : t_(std::move(toks)), line_(line), src_(src) {}

    // The template is untrusted (it comes from the model file): nesting is bounded so that a
    // pathological one fails with an error instead of exhausting the stack in the recursive descent
    // (and in the evaluation of the tree it would build).
    static constexpr int MAX_DEPTH = 100;
    ExprP parse_expr() {
        Nest n(this);
        return cond();
    }
    bool at_end() const { return t_[p_].kind == Tok::END; }
    bool is_name(const char* s) const { return t_[p_].kind == Tok::NAME && t_[p_].text == s; }
    bool is_op(const char* s) const { return t_[p_].kind == Tok::OP && t_[p_].text == s; }
    std::string name() {
        if (t_[p_].kind != Tok::NAME) fail("expected a name");
        return t_[p_++].text;
    }
    void expect_op(const char* s) {
        if (!is_op(s)) fail(std::string("expected '") + s + "'");
        ++p_;
    }
    void expect_name(const char* s) {
        if (!is_name(s)) fail(std::string("expected '") + s + "'");
        ++p_;
    }
    void expect_end() {
        if (!at_end()) fail("unexpected '" + t_[p_].text + "'");
    }
    [[noreturn]] void fail(const std::string& what) const {
        throw Error("chat template line " + std::to_string(line_) + ": " + what + " in '" + src_ + "'");
    }

private:
    std::vector<Tok> t_;
    size_t p_ = 0;
    int line_;
    const std::string& src_;
    int depth_ = 0;
    struct Nest {
        ExprParser* p;
        explicit Nest(ExprParser* q) : p(q) {
            if (++p->depth_ > MAX_DEPTH) p->fail("expression nested deeper than " + std::to_string(MAX_DEPTH));
        }
        ~Nest() { --p->depth_; }
    };

    ExprP cond() {
        Nest n(this);
        ExprP a = or_();
        if (is_name("if")) {
            ++p_;
            auto e = node(Expr::COND);
            ExprP c = or_();
            ExprP b = is_name("else") ? (++p_, cond()) : node(Expr::LIT);  // no else: undefined
            e->args.push_back(std::move(a));
            e->args.push_back(std::move(c));
            e->args.push_back(std::move(b));
            return e;
        }
        return a;
    }
    // a (op b)*, left-associative; op_at() consumes and returns the operator at the cursor, or "".
    template <class OpAt>
    ExprP chain(ExprP (ExprParser::*next)(), Expr::Kind kind, OpAt op_at) {
        ExprP a = (this->*next)();
        for (std::string op = op_at(); !op.empty(); op = op_at()) {
            a = on(std::move(a), kind, op);
            a->args.push_back((this->*next)());
        }
        return a;
    }
    std::string take_name(const char* kw) { return is_name(kw) ? (++p_, std::string(kw)) : std::string(); }
    std::string take_op(std::initializer_list<const char*> ops) {
        for (const char* op : ops) {
            if (is_op(op)) return ++p_, std::string(op);
        }
        return {};
    }
    // Comma-separated expressions appended to e.args, up to and including `close`.
    void items(Expr& e, const char* close) {
        while (!is_op(close)) {
            e.args.push_back(parse_expr());
            if (!is_op(",")) break;
            ++p_;
        }
        expect_op(close);
    }
    ExprP or_() { return chain(&ExprParser::and_, Expr::OR, [&] { return take_name("or"); }); }
    ExprP and_() { return chain(&ExprParser::not_, Expr::AND, [&] { return take_name("and"); }); }
    // A prefix operator at the cursor applied to operand().
    ExprP prefix(Expr::Kind kind, ExprP (ExprParser::*operand)()) {
        ++p_;
        auto e = node(kind);
        e->args.push_back((this->*operand)());
        return e;
    }
    ExprP not_() { return is_name("not") ? prefix(Expr::NOT, &ExprParser::not_) : compare(); }
    ExprP compare() {
        return chain(&ExprParser::math1, Expr::BIN, [&] {
            std::string op = take_op({"==", "!=", "<=", ">=", "<", ">"});
            if (op.empty()) op = take_name("in");
            if (op.empty() && is_name("not") && t_[p_ + 1].kind == Tok::NAME && t_[p_ + 1].text == "in") {
                p_ += 2;
                op = "not in";
            }
            return op;
        });
    }
    ExprP math1() { return chain(&ExprParser::concat, Expr::BIN, [&] { return take_op({"+", "-"}); }); }
    ExprP concat() { return chain(&ExprParser::math2, Expr::BIN, [&] { return take_op({"~"}); }); }
    ExprP math2() { return chain(&ExprParser::unary, Expr::BIN, [&] { return take_op({"*", "//", "/", "%"}); }); }
    ExprP unary() {
        Nest n(this);
        return is_op("-") ? prefix(Expr::NEG, &ExprParser::unary) : filters(postfix(primary()));
    }
    ExprP primary() {
        const Tok& t = t_[p_];
        if (t.kind == Tok::STRING) {
            ++p_;
            auto e = node(Expr::LIT);
            e->lit = Value::str(t.text);
            while (t_[p_].kind == Tok::STRING) e->lit.s += t_[p_++].text;  // adjacent literals join
            return e;
        }
        if (t.kind == Tok::INT) {
            ++p_;
            auto e = node(Expr::LIT);
            e->lit = Value::integer(t.value);
            return e;
        }
        if (t.kind == Tok::NAME) {
            ++p_;
            auto e = node(Expr::LIT);
            if (t.text == "true" || t.text == "True") e->lit = Value::boolean(true);
            else if (t.text == "false" || t.text == "False") e->lit = Value::boolean(false);
            else if (t.text == "none" || t.text == "None") e->lit = Value::none();
            else e = node(Expr::VAR, t.text);
            return e;
        }
        if (is_op("(")) {
            ++p_;
            ExprP e = parse_expr();
            expect_op(")");
            return e;
        }
        if (is_op("[")) {
            ++p_;
            auto e = node(Expr::LIST);
            items(*e, "]");
            return e;
        }
        fail(t.kind == Tok::END ? "unexpected end of expression" : "unexpected '" + t.text + "'");
    }
    ExprP postfix(ExprP a) {
        for (;;) {
            if (is_op(".")) {
                ++p_;
                std::string attr = name();
                a = on(std::move(a), Expr::ATTR, std::move(attr));
            } else if (is_op("[")) {
                ++p_;
                ExprP lo = is_op(":") ? nullptr : parse_expr();
                const bool slice = is_op(":");
                a = on(std::move(a), slice ? Expr::SLICE : Expr::INDEX);
                a->args.push_back(std::move(lo));
                if (slice) {
                    ++p_;
                    a->args.push_back(is_op("]") ? nullptr : parse_expr());
                }
                expect_op("]");
            } else if (is_op("(")) {
                ++p_;
                a = on(std::move(a), Expr::CALL);
                items(*a, ")");
            } else {
                return a;
            }
        }
    }
    ExprP filters(ExprP a) {
        for (;;) {
            if (is_op("|")) {
                ++p_;
                std::string filter = name();
                a = on(std::move(a), Expr::FILTER, std::move(filter));
                if (is_op("(")) {
                    ++p_;
                    items(*a, ")");
                }
            } else if (is_name("is")) {
                ++p_;
                const bool neg = is_name("not") ? (++p_, true) : false;
                std::string test = is_name("none") ? (++p_, std::string("none")) : name();
                a = on(std::move(a), Expr::TEST, test);
                a->negate = neg;
            } else {
                return a;
            }
        }
    }
};

// ---- statements -------------------------------------------------------------------------------

struct Stmt {
    enum Kind { TEXT, OUT, IF, FOR, SET } kind = TEXT;
    std::string text;                         // TEXT; FOR: loop variable; SET: name
    std::vector<ExprP> exprs;                 // OUT: value; IF: conditions; FOR: iterable; SET: value
    std::vector<std::vector<Stmt>> bodies;    // IF: one per condition (+ else); FOR: body (+ else)
};

// A lexed piece of template: text, {{ expr }} or {% stmt %}.
struct Piece {
    enum Kind { TEXT, EXPR, STMT } kind;
    std::string text;
    int line;
};

std::vector<Piece> lex_template(std::string src) {
    // jinja2's keep_trailing_newline=False: the source's one final newline is not output
    if (!src.empty() && src.back() == '\n') src.pop_back();
    std::vector<Piece> out;
    size_t pos = 0;
    int line = 1;
    bool line_start = true;  // the previous tag ended at the start of a line (jinja2's lstrip rule)
    const auto count_lines = [&](size_t a, size_t b) {
        for (size_t k = a; k < b; ++k) line += src[k] == '\n';
    };
    while (pos < src.size()) {
        size_t t = pos;
        for (;;) {
            t = src.find('{', t);
            if (t == std::string::npos || t + 1 >= src.size()) { t = std::string::npos; break; }
            const char k = src[t + 1];
            if (k == '{' || k == '%' || k == '#') break;
            ++t;
        }
        std::string text = src.substr(pos, (t == std::string::npos ? src.size() : t) - pos);
        if (t == std::string::npos) {
            out.push_back({Piece::TEXT, text, line});
            break;
        }
        const char kind = src[t + 1];
        const char mark = t + 2 < src.size() ? src[t + 2] : '\0';
        const int tag_line = line + static_cast<int>(std::count(text.begin(), text.end(), '\n'));
        if (mark == '-') {
            text = strip(text, false, true);
        } else if ((kind == '%' || kind == '#') && mark != '+') {  // lstrip_blocks
            const size_t nl = text.rfind('\n');
            const size_t l = nl == std::string::npos ? 0 : nl + 1;
            if ((l > 0 || line_start) && text.find_first_not_of(" \t", l) == std::string::npos) text.resize(l);
        }
        if (!text.empty()) out.push_back({Piece::TEXT, text, line});
        count_lines(pos, t);
        // the tag's end: "}}", "%}" or "#}", skipping string literals inside {{ }} and {% %}
        const char close = kind == '{' ? '}' : kind;
        size_t e = t + 2;
        char quote = 0;
        for (; e + 1 < src.size(); ++e) {
            const char c = src[e];
            if (kind != '#' && quote == 0 && (c == '\'' || c == '"')) quote = c;
            else if (quote != 0 && c == '\\') ++e;
            else if (quote != 0 && c == quote) quote = 0;
            else if (quote == 0 && c == close && src[e + 1] == '}') break;
        }
        if (e + 1 >= src.size()) throw Error("chat template line " + std::to_string(tag_line) + ": unclosed tag");
        const size_t inner_a = t + 2 + (mark == '-' || mark == '+');
        const bool strip_after = e > inner_a && src[e - 1] == '-';
        const std::string inner = src.substr(inner_a, e - (strip_after ? 1 : 0) - inner_a);
        count_lines(t, e + 2);
        pos = e + 2;
        if (strip_after) {
            const size_t a = pos;
            while (pos < src.size() && std::string(" \t\n\r\f\v").find(src[pos]) != std::string::npos) ++pos;
            count_lines(a, pos);
        } else if (kind != '{' && pos < src.size() && src[pos] == '\n') {  // trim_blocks
            ++pos;
            ++line;
        }
        line_start = pos == 0 || src[pos - 1] == '\n';
        if (kind == '{') out.push_back({Piece::EXPR, inner, tag_line});
        else if (kind == '%') out.push_back({Piece::STMT, inner, tag_line});
    }
    return out;
}

class Parser {
public:
    explicit Parser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

    // Statements until one of `stops` (a block keyword); *stop gets which one ("" at the end).
    std::vector<Stmt> block(std::initializer_list<const char*> stops, std::string* stop, ExprParser** tail) {
        // Bounded nesting of if/for blocks, for the reason given at ExprParser::MAX_DEPTH.
        struct Nest {
            int& d;
            explicit Nest(int& x) : d(x) {
                if (++d > ExprParser::MAX_DEPTH)
                    throw Error("chat template: blocks nested deeper than " + std::to_string(ExprParser::MAX_DEPTH));
            }
            ~Nest() { --d; }
        } nest(depth_);
        std::vector<Stmt> out;
        while (i_ < pieces_.size()) {
            const Piece& pc = pieces_[i_++];
            if (pc.kind == Piece::TEXT) {
                Stmt s;
                s.text = pc.text;
                out.push_back(std::move(s));
                continue;
            }
            ExprParser* ep = keep(pc);
            if (pc.kind == Piece::EXPR) {
                Stmt s;
                s.kind = Stmt::OUT;
                s.exprs.push_back(ep->parse_expr());
                ep->expect_end();
                out.push_back(std::move(s));
                continue;
            }
            const std::string kw = ep->name();
            for (const char* st : stops) {
                if (kw == st) {
                    *stop = kw;
                    *tail = ep;
                    return out;
                }
            }
            if (kw == "if") {
                out.push_back(parse_if(ep));
            } else if (kw == "for") {  // for NAME in EXPR
                Stmt s = name_and_expr(Stmt::FOR, ep, [ep] { ep->expect_name("in"); });
                std::string end;
                ExprParser* t = nullptr;
                s.bodies.push_back(block({"endfor", "else"}, &end, &t));
                if (end == "else") s.bodies.push_back(block({"endfor"}, &end, &t));
                if (end.empty()) ep->fail("missing {% endfor %}");
                out.push_back(std::move(s));
            } else if (kw == "set") {  // set NAME = EXPR
                out.push_back(name_and_expr(Stmt::SET, ep, [ep] { ep->expect_op("="); }));
            } else {
                ep->fail("unsupported statement '" + kw + "'");
            }
        }
        *stop = "";
        return out;
    }

private:
    std::vector<Piece> pieces_;
    size_t i_ = 0;
    int depth_ = 0;
    std::vector<std::unique_ptr<ExprParser>> parsers_;  // keep tag sources alive for messages

    ExprParser* keep(const Piece& pc) {
        parsers_.push_back(std::make_unique<ExprParser>(lex_expr(pc.text, pc.line), pc.line, pc.text));
        return parsers_.back().get();
    }

    template <class Separator>
    static Stmt name_and_expr(Stmt::Kind kind, ExprParser* ep, Separator separator) {
        Stmt s;
        s.kind = kind;
        s.text = ep->name();
        separator();
        s.exprs.push_back(ep->parse_expr());
        ep->expect_end();
        return s;
    }

    Stmt parse_if(ExprParser* ep) {
        Stmt s;
        s.kind = Stmt::IF;
        s.exprs.push_back(ep->parse_expr());
        ep->expect_end();
        for (;;) {
            std::string end;
            ExprParser* t = nullptr;
            s.bodies.push_back(block({"elif", "else", "endif"}, &end, &t));
            if (end.empty()) ep->fail("missing {% endif %}");
            if (end == "endif") return s;
            if (end == "elif") {
                s.exprs.push_back(t->parse_expr());
                t->expect_end();
                continue;
            }
            s.bodies.push_back(block({"endif"}, &end, &t));  // else
            if (end.empty()) ep->fail("missing {% endif %}");
            return s;
        }
    }
};

// ---- rendering --------------------------------------------------------------------------------

struct Context {
    std::vector<std::unordered_map<std::string, Value>> scopes;

    Value lookup(const std::string& n) const {
        for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
            const auto f = it->find(n);
            if (f != it->end()) return f->second;
        }
        return Value{};
    }
};

[[noreturn]] void type_error(const std::string& what) { throw Error("chat template: " + what); }

Value eval(const Expr& e, Context& ctx);

Value call_method(const Value& obj, const std::string& m, const std::vector<Value>& a) {
    if (obj.kind != Value::STR) type_error("no method '" + m + "' on a " + kind_name(obj.kind));
    const auto arg_str = [&](size_t k) {
        if (a.size() <= k || a[k].kind != Value::STR) type_error("'" + m + "' needs a string argument");
        return a[k].s;
    };
    if (m == "strip" || m == "lstrip" || m == "rstrip") {
        const bool l = m != "rstrip", r = m != "lstrip";
        return Value::str(a.empty() || a[0].kind == Value::NONE ? strip(obj.s, l, r) : strip(obj.s, l, r, arg_str(0)));
    }
    if (m == "upper" || m == "lower") return Value::str(ascii_case(obj.s, m == "upper"));
    if (m == "startswith") return Value::boolean(obj.s.compare(0, arg_str(0).size(), arg_str(0)) == 0);
    if (m == "endswith") {
        const std::string x = arg_str(0);
        return Value::boolean(obj.s.size() >= x.size() && obj.s.compare(obj.s.size() - x.size(), x.size(), x) == 0);
    }
    type_error("unsupported string method '" + m + "'");
}

Value binary(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return Value::boolean(equal(a, b));
    if (op == "!=") return Value::boolean(!equal(a, b));
    if (op == "~") return Value::str(to_text(a) + to_text(b));
    if (op == "in" || op == "not in") {
        bool hit = false;
        if (b.kind == Value::STR && a.kind == Value::STR) hit = b.s.find(a.s) != std::string::npos;
        else if (b.kind == Value::LIST) for (const Value& x : *b.list) hit = hit || equal(a, x);
        else if (b.kind == Value::MAP && a.kind == Value::STR) hit = b.key(a.s) != nullptr;
        else type_error(std::string("'in' on a ") + kind_name(b.kind));
        return Value::boolean(hit == (op == "in"));
    }
    if (a.kind == Value::INT && b.kind == Value::INT) {
        if (op == "+") return Value::integer(a.i + b.i);
        if (op == "-") return Value::integer(a.i - b.i);
        if (op == "*") return Value::integer(a.i * b.i);
        if (op == "<") return Value::boolean(a.i < b.i);
        if (op == ">") return Value::boolean(a.i > b.i);
        if (op == "<=") return Value::boolean(a.i <= b.i);
        if (op == ">=") return Value::boolean(a.i >= b.i);
        if ((op == "%" || op == "//") && b.i == 0) type_error("division by zero");
        if (op == "%") return Value::integer(((a.i % b.i) + b.i) % b.i);  // Python's sign rule
        if (op == "//") return Value::integer(a.i / b.i - ((a.i % b.i != 0) && ((a.i < 0) != (b.i < 0))));
    }
    if (a.kind == Value::STR && b.kind == Value::STR) {
        if (op == "+") return Value::str(a.s + b.s);
        if (op == "<") return Value::boolean(a.s < b.s);
        if (op == ">") return Value::boolean(a.s > b.s);
        if (op == "<=") return Value::boolean(a.s <= b.s);
        if (op == ">=") return Value::boolean(a.s >= b.s);
    }
    if (a.kind == Value::LIST && b.kind == Value::LIST && op == "+") {
        List l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::of_list(std::move(l));
    }
    type_error("unsupported operand types for '" + op + "': " + kind_name(a.kind) + " and " + kind_name(b.kind));
}

Value eval(const Expr& e, Context& ctx) {
    switch (e.kind) {
        case Expr::LIT: return e.lit;
        case Expr::VAR: return ctx.lookup(e.name);
        case Expr::LIST: {
            List l;
            for (const auto& x : e.args) l.push_back(eval(*x, ctx));
            return Value::of_list(std::move(l));
        }
        case Expr::ATTR: {
            const Value o = eval(*e.args[0], ctx);
            if (o.kind == Value::UNDEFINED) type_error("'" + e.name + "' of an undefined value");
            const Value* v = o.key(e.name);
            return v ? *v : Value{};
        }
        case Expr::INDEX: {
            const Value o = eval(*e.args[0], ctx);
            const Value k = eval(*e.args[1], ctx);
            if (o.kind == Value::MAP && k.kind == Value::STR) {
                const Value* v = o.key(k.s);
                return v ? *v : Value{};
            }
            if (o.kind == Value::LIST && k.kind == Value::INT) {
                const int64_t n = static_cast<int64_t>(o.list->size());
                const int64_t i = k.i < 0 ? k.i + n : k.i;
                return i >= 0 && i < n ? (*o.list)[i] : Value{};
            }
            type_error(std::string("cannot index a ") + kind_name(o.kind) + " with a " + kind_name(k.kind));
        }
        case Expr::SLICE: {
            const Value o = eval(*e.args[0], ctx);
            if (o.kind != Value::LIST && o.kind != Value::STR) type_error(std::string("cannot slice a ") + kind_name(o.kind));
            std::vector<size_t> at;  // a string's code point offsets: Python slices code points
            if (o.kind == Value::STR) {
                for (size_t k = 0; k < o.s.size(); ++k) {
                    if ((static_cast<uint8_t>(o.s[k]) & 0xC0) != 0x80) at.push_back(k);
                }
                at.push_back(o.s.size());
            }
            const int64_t n = o.kind == Value::STR ? static_cast<int64_t>(at.size()) - 1 : static_cast<int64_t>(o.list->size());
            const auto bound = [&](const ExprP& x, int64_t dflt) {
                if (!x) return dflt;
                const Value v = eval(*x, ctx);
                if (v.kind != Value::INT) type_error("slice bounds must be integers");
                const int64_t i = v.i < 0 ? v.i + n : v.i;
                return std::min<int64_t>(std::max<int64_t>(i, 0), n);
            };
            const int64_t lo = bound(e.args[1], 0), hi = bound(e.args[2], n);
            if (o.kind == Value::STR) return Value::str(lo < hi ? o.s.substr(at[lo], at[hi] - at[lo]) : std::string());
            return Value::of_list(lo < hi ? List(o.list->begin() + lo, o.list->begin() + hi) : List{});
        }
        case Expr::CALL: {
            std::vector<Value> a;
            for (size_t k = 1; k < e.args.size(); ++k) a.push_back(eval(*e.args[k], ctx));
            const Expr& callee = *e.args[0];
            if (callee.kind == Expr::VAR && callee.name == "raise_exception") {
                throw Error("chat template: " + (a.empty() ? std::string("raise_exception()") : to_text(a[0])));
            }
            if (callee.kind == Expr::ATTR) return call_method(eval(*callee.args[0], ctx), callee.name, a);
            type_error("unsupported function call");
        }
        case Expr::FILTER: {
            const Value v = eval(*e.args[0], ctx);
            if (e.name == "trim") {
                if (v.kind != Value::STR) type_error("trim of a " + std::string(kind_name(v.kind)));
                return Value::str(strip(v.s, true, true));
            }
            if (e.name == "length" || e.name == "count") {
                if (v.kind == Value::STR) return Value::integer(utf8_length(v.s));
                if (v.kind == Value::LIST) return Value::integer(static_cast<int64_t>(v.list->size()));
                if (v.kind == Value::MAP) return Value::integer(static_cast<int64_t>(v.map->size()));
                type_error("length of a " + std::string(kind_name(v.kind)));
            }
            if (e.name == "upper" || e.name == "lower") return Value::str(ascii_case(to_text(v), e.name == "upper"));
            if (e.name == "string") return Value::str(to_text(v));
            type_error("unsupported filter '" + e.name + "'");
        }
        case Expr::TEST: {
            const Value v = eval(*e.args[0], ctx);
            bool r;
            if (e.name == "defined") r = v.kind != Value::UNDEFINED;
            else if (e.name == "undefined") r = v.kind == Value::UNDEFINED;
            else if (e.name == "none") r = v.kind == Value::NONE;
            else if (e.name == "string") r = v.kind == Value::STR;
            else if (e.name == "mapping") r = v.kind == Value::MAP;
            else if (e.name == "sequence" || e.name == "iterable") r = v.kind == Value::LIST || v.kind == Value::STR || v.kind == Value::MAP;
            else if (e.name == "boolean") r = v.kind == Value::BOOL;
            else if (e.name == "integer" || e.name == "number") r = v.kind == Value::INT;
            else type_error("unsupported test 'is " + e.name + "'");
            return Value::boolean(r != e.negate);
        }
        case Expr::NOT: return Value::boolean(!eval(*e.args[0], ctx).truthy());
        case Expr::NEG: {
            const Value v = eval(*e.args[0], ctx);
            if (v.kind != Value::INT) type_error("unary '-' on a " + std::string(kind_name(v.kind)));
            return Value::integer(-v.i);
        }
        case Expr::AND: {
            Value a = eval(*e.args[0], ctx);
            return a.truthy() ? eval(*e.args[1], ctx) : a;
        }
        case Expr::OR: {
            Value a = eval(*e.args[0], ctx);
            return a.truthy() ? a : eval(*e.args[1], ctx);
        }
        case Expr::BIN: return binary(e.name, eval(*e.args[0], ctx), eval(*e.args[1], ctx));
        case Expr::COND: return eval(*e.args[1], ctx).truthy() ? eval(*e.args[0], ctx) : eval(*e.args[2], ctx);
    }
    return Value{};
}

void run(const std::vector<Stmt>& body, Context& ctx, std::string& out) {
    for (const Stmt& s : body) {
        switch (s.kind) {
            case Stmt::TEXT: out += s.text; break;
            case Stmt::OUT: out += to_text(eval(*s.exprs[0], ctx)); break;
            case Stmt::SET: ctx.scopes.back()[s.text] = eval(*s.exprs[0], ctx); break;
            case Stmt::IF: {
                size_t k = 0;
                while (k < s.exprs.size() && !eval(*s.exprs[k], ctx).truthy()) ++k;
                if (k < s.bodies.size()) run(s.bodies[k], ctx, out);
                break;
            }
            case Stmt::FOR: {
                const Value seq = eval(*s.exprs[0], ctx);
                List items;
                if (seq.kind == Value::LIST) items = *seq.list;
                else if (seq.kind == Value::MAP) for (const auto& kv : *seq.map) items.push_back(Value::str(kv.first));
                else if (seq.kind != Value::UNDEFINED) type_error(std::string("cannot iterate over a ") + kind_name(seq.kind));
                if (items.empty()) {
                    if (s.bodies.size() > 1) run(s.bodies[1], ctx, out);
                    break;
                }
                const int64_t n = static_cast<int64_t>(items.size());
                for (int64_t i = 0; i < n; ++i) {
                    ctx.scopes.emplace_back();  // jinja2: a {% set %} in the body stays in the body
                    ctx.scopes.back()[s.text] = items[i];
                    ctx.scopes.back()["loop"] = Value::of_map({
                        {"index", Value::integer(i + 1)}, {"index0", Value::integer(i)},
                        {"revindex", Value::integer(n - i)}, {"revindex0", Value::integer(n - i - 1)},
                        {"first", Value::boolean(i == 0)}, {"last", Value::boolean(i == n - 1)},
                        {"length", Value::integer(n)}});
                    run(s.bodies[0], ctx, out);
                    ctx.scopes.pop_back();
                }
                break;
            }
        }
    }
}

}  // namespace

struct ChatTemplate::Impl {
    std::vector<Stmt> body;
};

ChatTemplate::ChatTemplate(const std::string& source) : impl_(std::make_unique<Impl>()) {
    Parser p(lex_template(source));
    std::string stop;
    ExprParser* tail = nullptr;
    impl_->body = p.block({"endif", "endfor", "elif", "else"}, &stop, &tail);
    if (!stop.empty()) tail->fail("unexpected {% " + stop + " %}");
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                 const std::string& bos_token, const std::string& eos_token) const {
    List msgs;
    for (const ChatMessage& m : messages) {
        msgs.push_back(Value::of_map({{"role", Value::str(m.role)}, {"content", Value::str(m.content)}}));
    }
    Context ctx;
    ctx.scopes.emplace_back();
    ctx.scopes[0]["messages"] = Value::of_list(std::move(msgs));
    ctx.scopes[0]["add_generation_prompt"] = Value::boolean(add_generation_prompt);
    ctx.scopes[0]["bos_token"] = Value::str(bos_token);
    ctx.scopes[0]["eos_token"] = Value::str(eos_token);
    std::string out;
    run(impl_->body, ctx, out);
    return out;
}

}  // namespace flexquant
